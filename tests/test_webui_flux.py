"""Forge hands over its loaded Flux.1 model (tests/fakehost, Forge flavour, a tiny all-in-one Flux file).

The fake Forge holds the model as real Forge does (tests/data/hosts/forge_flux*.json.gz: BFL transformer,
LDM VAE, CLIP-L and T5 in transformers' names, inference tensors); the trainer builds its diffusers
modules from those tensors, trains, saves in kohya's Flux layout, and the host's own LoRA loader maps
every key of the file. Quantised transformers are read from the file instead, or refused when there is none.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import image_folder, quick_config
from trainer.hosts.base import ModelLoadError
from trainer.training.control import TrainControl
from test_webui import FAKEHOST
from test_webui import _purge_fake_host as _purge
from trainer.training.job import run_job


@pytest.fixture
def forge(tmp_path, monkeypatch):
    """Start a fake Forge with a tiny Flux file loaded: ``forge(schnell=..., fp8=...)`` -> (parts, config dir)."""
    monkeypatch.setenv("FAKEHOST_FLAVOUR", "forge")
    monkeypatch.setenv("FAKEHOST_ROOT", str(tmp_path / "webui"))
    _purge()
    monkeypatch.syspath_prepend(str(FAKEHOST))

    def start(name="flux1-dev.safetensors", **kwargs):
        import fakehost_setup
        import networks  # noqa: F401  (the built-in Lora extension, imported at start-up)
        from fakehost_models import generate
        from modules import sd_models, shared

        folder = tmp_path / "webui" / "models" / "Stable-diffusion"
        folder.mkdir(parents=True, exist_ok=True)
        parts = fakehost_setup.write_flux_file(folder / name, **kwargs)
        configs = fakehost_setup.write_flux_configs(tmp_path / "flux-configs", parts)
        sd_models.list_models()
        info = sd_models.get_closet_checkpoint_match(name)
        shared.opts.data["sd_model_checkpoint"] = info.title
        sd_models.model_data.forge_loading_parameters = dict(checkpoint_info=info, additional_modules=[],
                                                             unet_storage_dtype=None)
        sd_models.forge_model_reload()
        generate(shared.sd_model)
        return parts, configs

    yield start
    _purge()


def _host(configs):
    from trainer.hosts.webui_session import WebUIHost

    messages = []
    host = WebUIHost(config_dir=configs, log=messages.append)
    host.messages = messages
    return host


def _host_tensors(sd_model) -> dict:
    objects = sd_model.forge_objects
    out = {}
    for prefix, module in (("unet.", objects.unet.model.diffusion_model), ("clip.", objects.clip.cond_stage_model),
                           ("vae.", objects.vae.first_stage_model)):
        out.update({prefix + k: v.clone() for k, v in module.state_dict().items()})
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _assert_like_components(bundle, parts):
    """The bundle's modules hold the tensors of the components the file was written from."""
    for mine, theirs in ((bundle.unet, parts["unet"]), (bundle.vae, parts["vae"]),
                         (bundle.text_encoders[0], parts["text_encoders"][0]),
                         (bundle.text_encoders[1], parts["text_encoders"][1])):
        expected = theirs.state_dict()
        got = mine.state_dict()
        assert got.keys() == expected.keys(), type(theirs).__name__
        for key, value in expected.items():
            assert torch.equal(got[key].float(), value.float()), key


def test_the_loaded_flux_model_is_handed_over_and_put_back(forge):
    from modules import shared

    parts, configs = forge()
    sd_model = shared.sd_model
    before = _host_tensors(sd_model)
    host = _host(configs)
    bundle = host.load(quick_config(lora_data_directory="x"))
    try:
        assert bundle.family.name == "flux" and bundle.family.variant != "schnell"
        assert bundle.prediction_type == "flow" and bundle.noise_scheduler.config.use_dynamic_shifting
        _assert_like_components(bundle, parts)
        assert not any(p.is_inference() for m in (bundle.unet, *bundle.text_encoders) for p in m.parameters())
        assert bundle.tokenizers[1] is sd_model.forge_objects.clip.tokenizer.t5xxl  # the host's own tokenizers
        host_root = sd_model.forge_objects.unet.model.diffusion_model
        assert bundle.unet.x_embedder.weight.data_ptr() == host_root.img_in.weight.data_ptr()  # shared, no copy
        assert sd_model.forge_objects.unet.model.placement == "cpu"  # offloaded while it trains
        assert not any("from disk" in m for m in host.messages)
    finally:
        host.restore()
    assert shared.sd_model is sd_model and sd_model.forge_objects.unet.model.placement == "cuda"
    assert _same(_host_tensors(sd_model), before)


def test_schnell_is_told_by_its_missing_guidance_embedding(forge):
    parts, configs = forge("flux1-schnell.safetensors", schnell=True)
    host = _host(configs)
    bundle = host.load(quick_config(lora_data_directory="x"))
    try:
        assert bundle.family.variant == "schnell" and not bundle.unet.config.guidance_embeds
        cfg = bundle.noise_scheduler.config
        assert not cfg.use_dynamic_shifting and cfg.shift == 1.0
        _assert_like_components(bundle, parts)
    finally:
        host.restore()


def test_a_lora_run_on_the_loaded_flux_model_loads_in_forge_with_no_key_skipped(forge, tmp_path, capsys):
    """A LoRA run (transformer and both text encoders) saves kohya's Flux layout; Forge's loader maps every
    key of the file (0 unmatched, 0 skipped), in the run's own check in the host's txt2img too, and the
    host's model is bit-identical after the run."""
    from safetensors.torch import load_file

    import networks
    from modules import shared

    parts, configs = forge()
    sd_model = shared.sd_model
    before = _host_tensors(sd_model)
    host = _host(configs)
    data = image_folder(tmp_path / "data", n=2)
    cfg = quick_config(lora_data_directory=str(data), train_iterations="3", train_batch_size="1",
                       network_blocks="CLIP,T5,D00,D01,S00", save_lora_name="flux_host", host_check=True,
                       preview_size="16")
    result = run_job(cfg, host=host, logs_dir=tmp_path / "logs", control=TrainControl())
    assert shared.sd_model is sd_model and _same(_host_tensors(sd_model), before)
    [check] = [c for c in result.load_checks if c.in_host]
    assert check.ok and check.summary().endswith(f"loaded in {check.loader}: {check.modules} modules, 0 keys skipped")
    saved = result.saved[-1]
    assert saved.parent == Path(shared.cmd_opts.lora_dir)
    keys = load_file(str(saved))
    names = {k.split(".")[0] for k in keys}
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_1_txt_mlp_2",
            "lora_unet_single_blocks_0_linear1", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
            "lora_te3_encoder_block_0_layer_0_SelfAttention_q"} <= names
    assert all(f"{n}.alpha" in keys for n in names)
    assert all(keys[f"{n}.lora_up.weight"].abs().max() > 0 for n in names)  # every module trained (up starts at 0)
    from safetensors import safe_open

    with safe_open(str(saved), framework="pt") as handle:
        meta = handle.metadata()
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"]) == ("flux1", "flux-1-dev/lora")
    assert meta["ss_sd_model_name"] == "flux1-dev"  # the host's checkpoint
    capsys.readouterr()
    objects = sd_model.forge_objects
    unet, clip = networks.load_lora_for_models(objects.unet, objects.clip, networks.load_lora_state_dict(str(saved)),
                                               1.0, 1.0, filename=str(saved))
    report = capsys.readouterr().out
    assert "unmatched" not in report and "mismatch" not in report
    assert "for KModel-UNet with" in report and "for KModel-CLIP with" in report
    assert report.count("(skipped 0 keys)") == 2
    n_unet = sum(n.startswith("lora_unet_") for n in names)
    assert f"KModel-UNet with {n_unet} keys" in report and f"KModel-CLIP with {len(names) - n_unet} keys" in report


def test_a_quantised_transformer_is_read_from_its_file(forge):
    """fp8 storage (what Forge keeps for an fp8 file): the transformer comes from the file on disk, widened to
    bfloat16 exactly, with the reason logged; without a file the run is refused, saying why."""
    from modules import shared

    parts, configs = forge("flux1-dev-fp8.safetensors", fp8=True)
    sd_model = shared.sd_model
    assert sd_model.forge_objects.unet.model.storage_dtype == torch.float8_e4m3fn
    before = _host_tensors(sd_model)
    host = _host(configs)
    bundle = host.load(quick_config(lora_data_directory="x"))
    try:
        assert any("Reading the transformer of flux1-dev-fp8.safetensors from disk" in m and "quantised" in m
                   and "float8_e4m3fn" in m for m in host.messages), host.messages
        assert {p.dtype for p in bundle.unet.parameters()} == {torch.bfloat16}
        for key, value in parts["unet"].state_dict().items():  # the fp8 file's values, exactly
            stored = torch.bfloat16 if key.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight",
                                                     "norm_added_k.weight")) else torch.float8_e4m3fn
            assert torch.equal(bundle.unet.state_dict()[key], value.to(stored).to(torch.bfloat16)), key
    finally:
        host.restore()
    assert _same(_host_tensors(sd_model), before)
    Path(sd_model.sd_checkpoint_info.filename).unlink()
    with pytest.raises(ModelLoadError, match="cannot be trained as held in memory .*quantised.*checkpoint file is "
                                             "not available"):
        host.load(quick_config(lora_data_directory="x"))
    assert shared.sd_model is sd_model and sd_model.forge_objects.unet.model.placement == "cuda"


def test_text_encoders_held_in_fp8_are_widened_and_packed_ones_refused(forge):
    from modules import shared

    parts, configs = forge()
    encoders = shared.sd_model.forge_objects.clip.cond_stage_model
    layer = encoders.t5xxl.get_submodule("transformer.encoder.block.0.layer.0.SelfAttention")
    with torch.inference_mode():  # Forge's --clip-in-fp8-e4m3fn, on one layer here
        layer.q.weight = torch.nn.Parameter(layer.q.weight.to(torch.float8_e4m3fn), requires_grad=False)
    host = _host(configs)
    bundle = host.load(quick_config(lora_data_directory="x"))
    try:
        assert any("T5 text encoder in fp8; it is widened" in m for m in host.messages)
        q = bundle.text_encoders[1].state_dict()["encoder.block.0.layer.0.SelfAttention.q.weight"]
        assert q.dtype == torch.bfloat16 and torch.equal(q, layer.q.weight.to(torch.bfloat16))
    finally:
        host.restore()
    with torch.inference_mode():  # bitsandbytes nf4: packed bytes
        layer.q.weight = torch.nn.Parameter(torch.zeros(8, 1, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(ModelLoadError,
                       match="holds its T5 text encoder quantised .*uint8.*choose an fp16, bf16 or fp8 T5"):
        host.load(quick_config(lora_data_directory="x"))


def test_other_engines_are_named(forge):
    from trainer.hosts.webui import ForgeAdapter

    forge()
    adapter = ForgeAdapter()
    for kind, match in (("ZImage", "Forge has no Z-Image.*transformer file as the Model"),
                        ("Chroma", "cannot be trained .*Flux.1")):
        engine = type(kind, (), {"is_sd1": False, "is_sd2": False, "is_sdxl": False})()
        with pytest.raises(ModelLoadError, match=match):
            adapter.family(engine)


def test_the_file_reader_takes_an_all_in_one_files_transformer_and_names_packed_files(forge, tmp_path):
    """What the fallback reads: only the transformer of an all-in-one file (its VAE and text encoders are
    left unread), the same tensors the components had; a bitsandbytes-packed file is refused, saying why."""
    import ldm
    from modules import shared
    from trainer.hosts.components import read_json
    from trainer.hosts.dit_parts import load_transformer_file

    parts, configs = forge()
    path = Path(shared.sd_model.sd_checkpoint_info.filename)
    config = read_json(configs / "transformer" / "config.json")
    transformer = load_transformer_file(path, "flux", config, None)
    expected = parts["unet"].state_dict()
    assert transformer.state_dict().keys() == expected.keys()
    assert all(torch.equal(transformer.state_dict()[k], v) for k, v in expected.items())
    packed = ldm.keys_file(tmp_path / "flux1-dev-bnb-nf4.safetensors", {
        "model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": (16,),
        "model.diffusion_model.double_blocks.0.img_attn.qkv.weight": (96, 1),
        "model.diffusion_model.double_blocks.0.img_attn.qkv.weight.quant_state.bitsandbytes__nf4": (16,)})
    with pytest.raises(ModelLoadError, match="flux1-dev-bnb-nf4.safetensors holds quantised weights .*bitsandbytes "
                                             "nf4/fp4.*choose a bf16, fp16 or plain fp8"):
        load_transformer_file(packed, "flux", config, None)


def test_the_tabs_block_checkboxes_follow_the_loaded_flux_model(forge, tmp_path):
    """"(the loaded model)" in the tab lists Flux's block ids when Forge has a Flux model loaded."""
    from trainer.config.choices import FLUX_BLOCK_IDS
    from trainer.ui import form
    from trainer.ui.actions import TrainTrainUI, UiPaths

    _, configs = forge()
    host = _host(configs)
    assert host.model_family("") == "flux"
    ui = TrainTrainUI(host, standalone=False, paths=UiPaths.under(tmp_path))
    first, _ = ui.blocks_for_model(form.LOADED_MODEL, "", ["BASE", "IN01"], [])
    assert first["choices"] == list(FLUX_BLOCK_IDS)
    assert first["value"] == [b for b in FLUX_BLOCK_IDS if b not in ("CLIP", "T5")]


def test_a_lora_merged_by_the_last_generation_is_not_trained_on(forge):
    """A transformer carrying a generation's LoRA is read from the file (the same weights the file holds);
    text encoders carrying one are refused, saying what to do, and the model stays where it was."""
    from modules import shared

    parts, configs = forge()
    sd_model = shared.sd_model
    objects = sd_model.forge_objects
    objects.unet.lora_loader.backup = {"double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}
    host = _host(configs)
    bundle = host.load(quick_config(lora_data_directory="x"))
    try:
        assert any("from disk" in m and "LoRA merged in" in m for m in host.messages)
        _assert_like_components(bundle, parts)
    finally:
        host.restore()
    objects.unet.lora_loader.backup = {}
    objects.clip.patcher.lora_loader.backup = {"clip_l.transformer.x": torch.zeros(1)}
    with pytest.raises(ModelLoadError, match="text encoders carry a LoRA merged in .*generate once without a LoRA"):
        host.load(quick_config(lora_data_directory="x"))
    assert shared.sd_model is sd_model and objects.unet.model.placement == "cuda"
