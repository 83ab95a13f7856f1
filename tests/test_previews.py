"""Preview images during a run: written at the right steps, and never a change to what is trained."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import TinyHost, image_folder, quick_config
from tiny import tiny_bundle
from trainer.training.control import TrainControl
from trainer.training.job import run_job
from trainer.training.previews import default_prompts, render, split_prompts


def _quiet(msg):
    pass


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_render_draws_one_image_per_prompt_and_the_seed_decides(kind):
    bundle = tiny_bundle(kind)
    first = render(bundle, ["a red circle", "blue"], seed=3, size=(64, 48), steps=4)
    again = render(bundle, ["a red circle"], seed=3, size=(64, 48), steps=4)
    other = render(bundle, ["a red circle"], seed=4, size=(64, 48), steps=4)
    assert [im.size for im in first] == [(48, 64), (48, 64)]
    assert np.array_equal(np.asarray(first[0]), np.asarray(again[0]))
    assert not np.array_equal(np.asarray(first[0]), np.asarray(other[0]))


def test_default_prompts_follow_the_mode():
    lora = quick_config(lora_trigger_word="sks")
    assert default_prompts(lora, ["sks, a cat", "sks, a dog", "sks, a cow"]) == ["sks", "sks, a cat", "sks, a dog"]
    ileco = quick_config(mode="iLECO", original_prompt="red", target_prompt="blue")
    assert default_prompts(ileco) == ["red", "blue"]
    assert default_prompts(quick_config(preview_prompts="one\n\n two ")) == ["one", "two"]
    assert split_prompts("") == []


def test_previews_are_written_at_the_right_steps_and_do_not_change_the_trained_weights(tmp_path):
    data = image_folder(tmp_path / "data", n=2)
    saved, seen = {}, []
    for previews in (0, 2):
        cfg = quick_config(lora_data_directory=str(data), train_iterations="5", preview_every_steps=str(previews),
                           preview_size="32", preview_steps="2", preview_prompts="pattern\ncolourful",
                           save_lora_name=f"p{previews}")
        control = TrainControl(on_log=_quiet, on_preview=lambda step, paths: seen.append((step, [p.name for p in paths])))
        result = run_job(cfg, host=TinyHost("sd1", tmp_path / "out"), control=control, logs_dir=tmp_path / "logs")
        saved[previews] = load_file(str(result.saved[-1]))
        if previews:
            assert [p.name for p in result.previews] == ["step_2.png", "step_4.png"]
            assert all(p.parent.name == "previews" and p.parent.parent.name == "p2" for p in result.previews)
            sheet = Image.open(result.previews[0])
            assert sheet.size == (2 * 32 + 4, 2 * 32 + 4)  # two prompts x (network on, off)
        else:
            assert result.previews == []
    assert seen == [(2, ["step_2.png"]), (4, ["step_4.png"])]
    assert saved[0].keys() == saved[2].keys()
    for key in saved[0]:
        assert torch.equal(saved[0][key], saved[2][key]), key


def test_the_page_shows_the_previews_of_a_run_and_generates_the_ileco_prompts(tmp_path):
    from test_ui import ListingHost, _quick

    from trainer.ui.actions import UiPaths
    from trainer.ui.page import build_ui

    data = image_folder(tmp_path / "data", n=2)
    demo = build_ui(ListingHost("sd1", tmp_path / "out"), standalone=True, paths=UiPaths.under(tmp_path),
                    output_dir=tmp_path / "out", poll_s=0.05)
    ui = demo.traintrain
    assert not demo.traintrain_widgets["previews"].value
    seen = list(ui.start_shown(False, *_quick(data, train_iterations="4", preview_every_steps="2",
                                              preview_size="32", preview_steps="2", save_lora_name="shown")))
    assert "Finished" in seen[-1][1]
    galleries = [g for *_, g in seen if isinstance(g, list)]  # sent when it changed
    gallery = galleries[-1]
    assert gallery == ui.preview_gallery() and len(galleries) == len({len(g) for g in galleries})
    assert [caption for _, caption in gallery] == ["step 4: step_4.png", "step 2: step_2.png"]
    # the first two captions (no trigger word), each a row: network on | off
    assert all(Image.open(path).size == (68, 68) for path, _ in gallery)

    form = _quick(data, mode="iLECO", original_prompt="a red circle", target_prompt="a blue circle",
                  preview_size="32", preview_steps="2")
    images, message = ui.generate("All", *form)
    assert [c for _, c in images] == ["original: a red circle", "target: a blue circle"]
    assert all(im.size == (32, 32) for im, _ in images) and "seed 1" in message
    [(one, caption)], _ = ui.generate("Target", *form)
    assert caption == "target: a blue circle"
    assert np.array_equal(np.asarray(one), np.asarray(images[1][0]))  # "All" used the same seed for both
    assert ui.generate("Original", *_quick(data, mode="iLECO"))[1] == "Type the original prompt first."
