"""The saved file checked in the web UI's own txt2img, and the prompt preview rendered there, on the fake
host of both flavours (tests/fakehost: processing, extra networks and each host's LoRA loader).

The fake host applies a ``<lora:...>`` the way each real one does (A1111 matches module names and
changes each layer's weight when it runs; Forge patches clones of its patchers and prints what its
loader matched), and its "sampler" draws from the seed, the prompt and the weights as they are, so a
file that changed nothing draws the base model's image to the pixel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from network_helpers import randomize
from test_webui import _host, _lock, assets, webui  # noqa: F401  (fixtures)
from tiny import tiny_bundle
from trainer.network.io import save_network
from trainer.network.network import NetworkSpec, create_network


def _all_weights(sd_model) -> dict:
    if hasattr(sd_model, "forge_objects"):
        objects = sd_model.forge_objects
        modules = {"unet": objects.unet.model.diffusion_model, "te": objects.clip.cond_stage_model}
    else:
        modules = {"model": sd_model}
    return {f"{n}.{k}": v.clone() for n, m in modules.items() for k, v in m.state_dict().items()}


def _saved(webui, network_type: str, name: str):
    net = create_network(tiny_bundle("sd1"), NetworkSpec(rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0,
                                                         train_text_encoder=True, network_type=network_type))
    randomize(net)
    webui.lora_dir.mkdir(parents=True, exist_ok=True)
    return net, save_network(net, webui.lora_dir / f"{name}.safetensors", metadata={}, dtype=torch.float32)


def _same(a, b) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("network_type", ["lierla", "c3lier", "loha"])
def test_saved_file_is_rendered_and_loaded_in_the_host_with_no_key_skipped(webui, network_type):
    from modules import processing, shared

    net, path = _saved(webui, network_type, f"check_{network_type}")
    sd_model = shared.sd_model
    before = _all_weights(sd_model)
    host = _host(webui)
    base, _ = host.generate(["a cat", "a dog"], seed=3, size=(16, 24))
    loads, rows, setup = host.check_saved([(path, [0.0, 0.5, 1.0])], prompts=["a cat", "a dog"], seed=3,
                                          size=(16, 24))
    [load] = loads
    assert (load.error, load.unmatched) == ("", [])
    assert load.modules == load.file_modules == len(net.all_modules) > 0
    if webui.flavour == "forge":  # the host's own words: UNet and CLIP keys, none skipped
        assert any("for KModel-UNet with" in line and "(skipped 0 keys)" in line for line in load.said)
        assert any("for KModel-CLIP with" in line for line in load.said)
    assert [[(w, p) for w, p, _ in row] for row in rows] == [[(0.0, path), (0.5, path), (1.0, path)]] * 2
    for row, alone in zip(rows, base):
        (_, _, off), (_, _, half), (_, _, full) = row
        assert off.size == (24, 16) and _same(off, alone)   # weight 0 is the base model, to the pixel
        assert not _same(full, alone) and not _same(half, full)
    # the host's txt2img settings and the <lora> path of its prompts
    prompt, sampler, scheduler, steps, cfg, width, height, seed = processing.generations[-1]
    assert prompt == f"a dog <lora:{path.stem}:1>" and (width, height, seed) == (24, 16, 3)
    expected = ("Euler a", "Automatic", 7.0) if webui.flavour == "forge" else (None, None, 7.0)
    assert (sampler, scheduler, cfg) == expected and steps == setup.steps == 20
    # the host's model exactly as before, lock free, job ended
    after = _all_weights(shared.sd_model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert shared.sd_model is sd_model and not _lock().locked() and shared.state.job == ""
    again, _ = host.generate(["a cat"], seed=3, size=(16, 24))
    assert _same(again[0], base[0])


@pytest.mark.parametrize("renamed", [2, "all"])
def test_a_corrupted_file_is_reported_with_its_unmatched_keys(webui, renamed):
    from trainer.training.loadcheck import LoadCheck

    _, path = _saved(webui, "lierla", "good")
    tensors = load_file(str(path))
    modules = sorted({k.split(".")[0] for k in tensors if k.startswith("lora_unet_")})
    bad = set(modules if renamed == "all" else modules[:renamed])
    rename = {m: m.replace("lora_unet_", "lora_unet_nowhere_") for m in bad}
    broken = path.with_name("broken.safetensors")
    save_file({rename.get(k.split(".")[0], k.split(".")[0]) + "." + k.split(".", 1)[1]: v
               for k, v in tensors.items()}, str(broken))
    host = _host(webui)
    [load], _, _ = host.check_saved([(broken, [1.0])], prompts=["a cat"], seed=1, size=(8, 8))
    assert load.unmatched == sorted(rename.values())
    check = LoadCheck(load.file, load.host, modules=load.modules, file_modules=load.file_modules,
                      unmatched=load.unmatched, error=load.error, in_host=True)
    assert not check.ok and sorted(rename.values())[0] in check.summary()
    if webui.flavour == "forge" and renamed == "all":  # more than 12 keys: Forge does not use the file
        assert load.error.startswith("Forge did not use it: [LORA] LoRA version mismatch")
    else:
        assert load.error == "" and load.modules == load.file_modules - len(bad)
        assert f"loaded in {load.host}: {load.modules} modules, {len(bad)} keys skipped" in check.summary()


def test_settings_come_from_the_host_ui_config(webui):
    import json

    from modules import shared

    config = {"txt2img/CFG Scale/value": 4.5, "customscript/sampler.py/txt2img/Sampling steps/value": 9,
              "txt2img/Sampling method/value": "DDIM"}
    with open(shared.cmd_opts.ui_config_file, "w", encoding="utf-8") as handle:
        json.dump(config, handle)
    setup = _host(webui).txt2img_settings()
    assert (setup.sampler, setup.steps, setup.cfg_scale) == ("DDIM", 9, 4.5)
    assert setup.scheduler == ("Automatic" if webui.flavour == "forge" else None)


def test_generate_buttons_render_in_the_host_with_one_seed(webui, tmp_path):
    from test_ui import _quick

    from modules import processing
    from trainer.ui.actions import TrainTrainUI, UiPaths

    ui = TrainTrainUI(_host(webui), standalone=False, paths=UiPaths.under(tmp_path))
    form = _quick(tmp_path, mode="iLECO", original_prompt="a red circle", target_prompt="a blue circle",
                  preview_seed="5")
    images, message = ui.generate("All", *form)
    assert [c for _, c in images] == ["original: a red circle", "target: a blue circle"]
    assert "the web UI's txt2img" in message and "seed 5" in message
    assert [g[0] for g in processing.generations[-2:]] == ["a red circle", "a blue circle"]
    assert {g[-1] for g in processing.generations[-2:]} == {5}
    [(one, _)], _ = ui.generate("Target", *form)
    assert _same(one, images[1][0])
    if webui.flavour == "forge":
        from modules_forge import main_thread

        assert main_thread.calls >= 3  # generation went through Forge's main thread


@pytest.mark.slow
def test_a_run_in_the_tab_ends_with_the_check_in_the_host(webui, tmp_path):
    from test_webui import _run

    from modules import shared

    host = _host(webui)
    before = _all_weights(shared.sd_model)
    result, _ = _run(webui, tmp_path, host, save_lora_name="checked", network_type="c3lier",
                     preview_size="16", host_check=True)
    [check] = [c for c in result.load_checks if c.in_host]
    assert check.ok and check.summary().endswith(f"loaded in {check.loader}: {check.modules} modules, 0 keys skipped")
    sheet = result.previews[-1]
    assert sheet.name == "host_check.png" and sheet.is_file()
    singles = sorted(p.name for p in sheet.parent.glob("host_checked_w*_*.png"))
    assert {n for n in singles if n.endswith("_0.png")} == {"host_checked_w0_0.png", "host_checked_w0.5_0.png",
                                                         "host_checked_w1_0.png"}
    assert len(singles) % 3 == 0  # every preview prompt at the three weights
    after = _all_weights(shared.sd_model)
    assert all(torch.equal(after[k], before[k]) for k in before) and not _lock().locked()


@pytest.mark.parametrize("network_type", ["lierla", "loha"])
def test_an_sdxl_file_loads_in_the_host_with_no_key_skipped(webui, network_type):
    """SDXL files name the U-Net's modules the LDM way (as sd-scripts writes them); the U-Net's
    modules all load in the host's SDXL model."""
    from modules import sd_models, shared

    info = sd_models.get_closet_checkpoint_match("xl.safetensors")
    if webui.flavour == "forge":
        sd_models.model_data.forge_loading_parameters = dict(checkpoint_info=info, additional_modules=[])
        sd_models.forge_model_reload()
    else:
        sd_models.reload_model_weights(info=info)
    net = create_network(tiny_bundle("sdxl"), NetworkSpec(rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0,
                                                          train_text_encoder=False, network_type=network_type))
    randomize(net)
    webui.lora_dir.mkdir(parents=True, exist_ok=True)
    path = save_network(net, webui.lora_dir / f"xl_{network_type}.safetensors", metadata={}, dtype=torch.float32)
    before = _all_weights(shared.sd_model)
    [load], [row], _ = _host(webui).check_saved([(path, [0.0, 1.0])], prompts=["a cat"], seed=2, size=(8, 8))
    assert (load.error, load.unmatched) == ("", [])
    assert load.modules == load.file_modules == len(net.all_modules) > 0
    assert not _same(row[0][2], row[1][2])
    after = _all_weights(shared.sd_model)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_a_lora_left_merged_by_the_last_generation_is_taken_out_not_read_from_disk(webui):
    """Both hosts leave a prompt's LoRA merged into the weights after a generation (backups kept
    by their loaders). A run on the loaded model puts the originals back with the host's own
    loader and shares them, instead of reading the checkpoint file (a second copy of the model);
    the host's next generation with that LoRA merges it again."""
    from test_webui import _unet_out

    from helpers import quick_config
    from modules import processing, shared
    from trainer.hosts.webui import adapter

    _, path = _saved(webui, "lierla", "left_merged")
    sd_model = shared.sd_model
    before = _all_weights(sd_model)

    def render():
        p = processing.StableDiffusionProcessingTxt2Img(prompt=f"a cat <lora:{path.stem}:1>", seed=3, steps=2,
                                                        width=16, height=16)
        return processing.process_images(p).images[0]

    with_lora = render()
    assert adapter().lora_merged(sd_model)  # as the real hosts leave it
    host = _host(webui)
    bundle = host.load(quick_config(lora_data_directory="x"))
    try:
        assert any("was taken out with" in m for m in host.messages), host.messages
        assert not any("from disk" in m for m in host.messages)
        assert torch.allclose(_unet_out(bundle.unet), _unet_out(webui.parts["base"]["unet"]), atol=1e-5)
        root = (sd_model.forge_objects.unet.model.diffusion_model if webui.flavour == "forge"
                else sd_model.model.diffusion_model)
        host_conv = root.get_submodule("input_blocks.0.0").weight
        assert bundle.unet.conv_in.weight.data_ptr() == host_conv.data_ptr()  # shared, not read from the file
    finally:
        host.restore()
    assert shared.sd_model is sd_model
    after = _all_weights(sd_model)
    assert all(torch.equal(after[k], before[k]) for k in before)  # the originals, LoRA out
    assert _same(render(), with_lora)  # and the host's next generation merges it again


def test_the_merged_copies_are_handed_back_to_the_system_once_the_lora_is_off(webui, monkeypatch):
    """A host generating with a LoRA merges copies of the weights it patches (real Forge with an
    SDXL U-Net: ~5 GB that stayed resident). The host check, and a run that takes out a LoRA the
    last generation left merged, hand the freed heap back (malloc_trim) after the LoRA is off."""
    import trainer.heap
    from helpers import quick_config
    from modules import processing, shared
    from trainer.hosts.webui import adapter

    _, path = _saved(webui, "lierla", "trimmed")
    sd_model = shared.sd_model
    trims = []
    monkeypatch.setattr(trainer.heap, "return_freed_memory",
                        lambda: trims.append(adapter().lora_merged(sd_model)) or True)
    host = _host(webui)
    host.check_saved([(path, [1.0])], prompts=["a cat"], seed=3, size=(8, 8))
    assert trims == [False]  # once, with the LoRA already taken off

    trims.clear()
    p = processing.StableDiffusionProcessingTxt2Img(prompt=f"a cat <lora:{path.stem}:1>", seed=3, steps=2,
                                                    width=16, height=16)
    processing.process_images(p)
    assert adapter().lora_merged(sd_model)
    host.load(quick_config(lora_data_directory="x"))
    try:
        assert trims == [False]  # the LoRA the generation left was taken out, then the trim
    finally:
        host.restore()
    assert trims[-1] is False and len(trims) == 2  # and the bundle's freed memory after the run
