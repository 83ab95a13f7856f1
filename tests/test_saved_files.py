"""What real runs on tiny models write into their files: the header describes the run and the
tensors it holds, and every mode reads its images the same way."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import TinyHost, image_folder, pattern_image, quick_config
from trainer.training.control import TrainControl
from trainer.training.job import run_job


def _header(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def _modules(tensors: dict) -> set:
    return {k.split(".", 1)[0] for k in tensors}


@pytest.mark.slow
def test_ss_steps_is_the_optimizer_step_count_of_every_save(tmp_path):
    data = image_folder(tmp_path / "data", n=2)
    out, logs = tmp_path / "out", tmp_path / "logs"
    cfg = quick_config(lora_data_directory=str(data), train_iterations="5", save_per_steps="2",
                       save_lora_name="steps")
    stop = TrainControl()

    def stop_at_3(event):
        if event.step == 3 and not event.message:
            stop.stop()

    stop.listen(on_progress=stop_at_3)
    first = run_job(cfg, host=TinyHost("sd1", out), logs_dir=logs, control=stop)
    assert first.stopped
    second = run_job(cfg, host=TinyHost("sd1", out), logs_dir=logs, resume=True)
    saved = [p.name for p in first.saved + second.saved]
    assert saved == ["steps_2steps.safetensors", "steps_3steps.safetensors", "steps_4steps.safetensors",
                     "steps.safetensors"]
    # periodic save, stop save, periodic save after the resume, final save
    assert [_header(p)["ss_steps"] for p in first.saved + second.saved] == ["2", "3", "4", "5"]
    assert _header(out / "steps.safetensors")["ss_max_train_steps"] == "5"


def test_ss_tag_frequency_counts_the_captions_per_dataset_folder(tmp_path):
    data = image_folder(tmp_path / "my_set", n=2)  # captions "pattern number <i>, colourful"
    cfg = quick_config(lora_data_directory=str(data), train_iterations="1", lora_trigger_word="Pat",
                       image_mirroring=True, save_lora_name="tags")
    res = run_job(cfg, host=TinyHost("sd1", tmp_path / "out"), logs_dir=tmp_path / "logs")
    # sd-scripts' shape: {folder name: {tag: count}}, lower-cased tags, a mirrored copy not counted again
    assert json.loads(_header(res.saved[-1])["ss_tag_frequency"]) == {
        "my_set": {"pat": 2, "pattern number 0": 1, "pattern number 1": 1, "colourful": 2}}


def test_multi_addift_writes_the_tag_frequency_of_both_images_of_each_pair(tmp_path):
    data = tmp_path / "pair_set"
    data.mkdir()
    for i in range(2):
        pattern_image(data / f"p{i}.png", i)
        (data / f"p{i}.txt").write_text("face, eyes open", encoding="utf-8")
        pattern_image(data / f"p{i}_t.png", i + 5)
        (data / f"p{i}_t.txt").write_text("face, eyes closed", encoding="utf-8")
    cfg = quick_config(mode="Multi-ADDifT", lora_data_directory=str(data), diff_target_name="_t",
                       train_iterations="1", save_lora_name="pairs")
    res = run_job(cfg, host=TinyHost("sd1", tmp_path / "out"), logs_dir=tmp_path / "logs")
    assert json.loads(_header(res.saved[-1])["ss_tag_frequency"]) == {
        "pair_set": {"face": 4, "eyes open": 2, "eyes closed": 2}}


@pytest.mark.slow
@pytest.mark.parametrize("network_type, rank_key", [("lierla", "lora_down.weight"), ("loha", "hada_w1_b")])
def test_metadata_describes_the_resumed_file_not_the_requested_rank(tmp_path, network_type, rank_key):
    data = image_folder(tmp_path / "data", n=2)
    out, logs = tmp_path / "out", tmp_path / "logs"
    small = quick_config(lora_data_directory=str(data), train_iterations="1", network_type=network_type,
                         network_rank="8", network_alpha="2", network_element="CrossAttention",
                         save_lora_name="rank8")
    first = run_job(small, host=TinyHost("sd1", out), logs_dir=logs)
    big = quick_config(lora_data_directory=str(data), train_iterations="1", network_type=network_type,
                       network_rank="16", network_alpha="16", network_resume=str(first.saved[-1]),
                       save_lora_name="resumed")
    res = run_job(big, host=TinyHost("sd1", out), logs_dir=logs)
    tensors, meta = load_file(str(res.saved[-1])), _header(res.saved[-1])
    assert {v.shape[0] for k, v in tensors.items() if k.endswith(rank_key)} == {8}
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "2.0"
    # the file's modules (cross-attention only), not the full set the config asks for
    file_modules = _modules(load_file(str(first.saved[-1])))
    assert _modules(tensors) == file_modules
    assert meta["traintrain_network_modules"] == str(len(file_modules))
    assert meta["traintrain_network_unet_modules"] == str(len(file_modules))
    assert meta["traintrain_network_te_modules"] == "0" and meta["ss_network_train_unet_only"] == "True"
    assert json.loads(meta["traintrain_config"])["network_rank"] == "16"  # what was asked stays on record


def _upright_pair(tmp_path):
    """An RGB original (64x48) and an 8-bit grayscale target, stored plainly."""
    folder = tmp_path / "plain"
    folder.mkdir()
    orig = pattern_image(folder / "orig.png", 3, size=(64, 48))
    gray = (np.asarray(Image.open(pattern_image(folder / "t.png", 8, size=(64, 48))).convert("L")))
    Image.fromarray(gray, "L").save(folder / "target.png")
    return orig, folder / "target.png", gray


def _stored_differently(tmp_path, orig, gray):
    """The same pair as a phone and a scanner store it: the original rotated on disk with an EXIF
    orientation that turns it upright, the target as a 16-bit grayscale PNG."""
    folder = tmp_path / "odd"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.open(orig).transpose(Image.Transpose.ROTATE_90).save(folder / "orig.png", exif=exif.tobytes())
    sixteen = Image.fromarray(gray.astype(np.uint16) * 257)
    assert sixteen.mode == "I;16"
    sixteen.save(folder / "target.png")
    assert Image.open(folder / "orig.png").size == (48, 64)
    return folder / "orig.png", folder / "target.png"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ADDifT", "Difference"])
def test_pair_modes_read_images_upright_and_16_bit_like_every_mode(tmp_path, mode):
    orig, target, gray = _upright_pair(tmp_path)
    odd_orig, odd_target = _stored_differently(tmp_path, orig, gray)
    files = []
    for name, (a, b) in (("plain", (orig, target)), ("odd", (odd_orig, odd_target))):
        cfg = quick_config(mode=mode, original_image=str(a), target_image=str(b), train_iterations="2",
                           train_batch_size="1", save_lora_name=name)
        files.append(run_job(cfg, host=TinyHost("sd1", tmp_path / "out"), logs_dir=tmp_path / "logs").saved[-1])
    plain, odd = load_file(str(files[0])), load_file(str(files[1]))
    assert plain.keys() == odd.keys()
    assert any(v.abs().sum() > 0 for k, v in plain.items() if k.endswith("lora_up.weight"))  # it trained
    for k in plain:
        torch.testing.assert_close(odd[k], plain[k], atol=1e-6, rtol=1e-5, msg=k)
