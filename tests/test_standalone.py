"""Standalone loading: single files (LDM keys) and diffusers folders into a ModelBundle, offline.

Tiny SD1/SD2/SDXL components are written as LDM single files (tests/ldm.py) and loaded back;
equal outputs prove the key conversion. Full-size configs: test_standalone_full_size.py.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

import ldm
from tiny import save_tiny_diffusers, tiny_components, tiny_vae
from trainer.hosts.base import Host, ModelLoadError
from trainer.hosts.standalone import StandaloneHost, load_model

KINDS = ("sd1", "sd2", "sdxl")


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test: loading must never reach a hub."""
    ldm.block_network(monkeypatch)


def _unet_out(unet, kind):
    torch.manual_seed(3)
    latents, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    context = torch.randn(1, 77, unet.config.cross_attention_dim)
    extra = {}
    if kind == "sdxl":
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32),
                                      "time_ids": torch.tensor([[8.0, 8, 0, 0, 8, 8]])}
    with torch.no_grad():
        return unet(latents, t, context, **extra).sample


def _vae_out(vae):
    torch.manual_seed(4)
    with torch.no_grad():
        latent = vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1).latent_dist.mean
        return latent, vae.decode(latent).sample


def _te_out(te, tokenizer):
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = te(ids, output_hidden_states=True)
    pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    return out.last_hidden_state, out.hidden_states[-2], pooled


def assert_same_model(bundle, parts, kind):
    torch.testing.assert_close(_unet_out(bundle.unet, kind), _unet_out(parts["unet"], kind), rtol=0, atol=1e-6)
    for got, want in zip(_vae_out(bundle.vae), _vae_out(parts["vae"])):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert len(bundle.text_encoders) == len(parts["text_encoders"]) == len(bundle.tokenizers)
    for te, tok, want_te, want_tok in zip(bundle.text_encoders, bundle.tokenizers,
                                          parts["text_encoders"], parts["tokenizers"]):
        assert type(te) is type(want_te)
        assert tok.pad_token == want_tok.pad_token
        for got, want in zip(_te_out(te, tok), _te_out(want_te, want_tok)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
@pytest.mark.parametrize("kind", KINDS)
def test_single_file_round_trip(tmp_path, no_network, kind, fmt):
    path = tmp_path / f"tiny-{kind}.{fmt}"
    parts = ldm.write_single_file(kind, path, fmt)
    config_dir = ldm.write_config_dir(kind, tmp_path / "configs")
    bundle = load_model(path, config_dir=config_dir)
    assert bundle.family.name == kind
    assert bundle.metadata["family_source"] == "keys"
    assert bundle.metadata["model_name"] == f"tiny-{kind}"
    assert bundle.prediction_type == "epsilon" and bundle.metadata["v_pred_source"] == "default"
    assert bundle.noise_scheduler.config.prediction_type == "epsilon"
    assert bundle.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert not any(p.requires_grad for p in bundle.unet.parameters())
    assert bundle.device == torch.device("cpu")
    assert_same_model(bundle, parts, kind)


def test_conversion_assigns_tensors_without_copying(tmp_path):
    """Matching dtype: the built modules use the state dict's own tensors (what a web-UI host relies on)."""
    from trainer.hosts.ldm_convert import build_text_encoder, build_unet

    parts = tiny_components("sd1")
    state = ldm.ldm_state_dict("sd1", parts)
    unet = build_unet(state, dict(parts["unet"].config))
    assert unet.conv_in.weight.data_ptr() == state[ldm.UNET + "input_blocks.0.0.weight"].data_ptr()
    config_file = ldm.write_config_dir("sd1", tmp_path, parts) / "text_encoder" / "config.json"
    te = build_text_encoder(state, config_file, layout="clip", ldm_prefix="cond_stage_model.transformer.")
    norm = next(p for n, p in te.named_parameters() if n.endswith("final_layer_norm.weight"))
    assert norm.data_ptr() == state["cond_stage_model.transformer.text_model.final_layer_norm.weight"].data_ptr()


def test_dtype_option_casts_every_module(tmp_path):
    path = tmp_path / "m.safetensors"
    ldm.write_single_file("sd1", path)
    bundle = load_model(path, config_dir=ldm.write_config_dir("sd1", tmp_path / "c"), dtype=torch.bfloat16)
    for module in (bundle.unet, bundle.vae, *bundle.text_encoders):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}


@pytest.mark.slow
def test_diffusers_folder_loads(tmp_path, no_network):
    for kind in ("sd1", "sdxl"):
        folder = save_tiny_diffusers(kind, tmp_path / kind, seed=5)
        bundle = load_model(folder)
        assert bundle.family.name == kind and bundle.metadata["format"] == "diffusers"
        assert_same_model(bundle, tiny_components(kind, seed=5), kind)
    sd2 = load_model(save_tiny_diffusers("sd2", tmp_path / "sd2"))
    assert sd2.family.name == "sd2"
    assert sd2.prediction_type == "v_prediction" and sd2.metadata["v_pred_source"] == "scheduler config"
    assert load_model(tmp_path / "sd2", v_pred=False).prediction_type == "epsilon"


@pytest.mark.slow
def test_family_option_and_folder_errors(tmp_path):
    path = tmp_path / "m.safetensors"
    ldm.write_single_file("sd1", path)
    bundle = load_model(path, family="sd1", config_dir=ldm.write_config_dir("sd1", tmp_path / "c1"))
    assert bundle.family.name == "sd1" and bundle.metadata["family_source"] == "option"
    with pytest.raises(ModelLoadError, match="family must be one of sd1, sd2, sdxl, flux, zimage .*'sd3'"):
        load_model(path, family="sd3")
    with pytest.raises(ModelLoadError, match=r"m\.safetensors (lacks|has) .*weight|do not fit"):
        load_model(path, family="sd2", config_dir=ldm.write_config_dir("sd2", tmp_path / "c2"))
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text('{"_class_name": "FluxPipeline", "text_encoder": ["x", "y"]}')
    with pytest.raises(ModelLoadError, match="config file not found: .*flux.transformer.config.json"):
        load_model(flux)  # a Flux folder is read as one, and its missing parts are named
    with pytest.raises(ModelLoadError, match="without model_index.json"):
        load_model(tmp_path / "c1")


@pytest.mark.slow
def test_separate_vae_replaces_the_checkpoint_vae(tmp_path):
    path = tmp_path / "model.safetensors"
    config_dir = ldm.write_config_dir("sd1", tmp_path / "c")
    ldm.write_single_file("sd1", path)
    torch.manual_seed(7)
    other = tiny_vae()
    vae_file = ldm.save_state_dict(ldm.vae_to_ldm(other, prefix=""), tmp_path / "other.vae.safetensors")
    ckpt_vae = ldm.save_state_dict(ldm.vae_to_ldm(other), tmp_path / "other_vae.ckpt", "ckpt")
    diffusers_names = ldm.save_state_dict(other.state_dict(), tmp_path / "diffusion_pytorch_model.safetensors")
    other.save_pretrained(tmp_path / "vae_folder")
    for source in (vae_file, ckpt_vae, diffusers_names, tmp_path / "vae_folder"):
        bundle = load_model(path, config_dir=config_dir, vae_path=source)
        assert bundle.metadata["vae"] == str(source)
        for got, want in zip(_vae_out(bundle.vae), _vae_out(other)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # A checkpoint without VAE weights loads when a VAE is given, and says what is missing otherwise.
    no_vae = tmp_path / "no_vae.safetensors"
    ldm.write_single_file("sd1", no_vae, with_vae=False)
    assert load_model(no_vae, config_dir=config_dir, vae_path=vae_file).vae is not None
    with pytest.raises(ModelLoadError, match="no VAE weights"):
        load_model(no_vae, config_dir=config_dir)
    with pytest.raises(ModelLoadError, match="cannot be used as the VAE.*LoRA"):
        load_model(path, config_dir=config_dir, vae_path=_lora_file(tmp_path))


@pytest.mark.slow
def test_v_prediction_option_and_keys(tmp_path):
    config_dir = ldm.write_config_dir("sd1", tmp_path / "c")
    plain = tmp_path / "plain.safetensors"
    ldm.write_single_file("sd1", plain)
    forced = load_model(plain, config_dir=config_dir, v_pred=True)
    assert forced.prediction_type == "v_prediction" and forced.is_v_prediction
    assert forced.noise_scheduler.config.prediction_type == "v_prediction"
    assert forced.metadata["v_pred_source"] == "option"

    marked = tmp_path / "marked.safetensors"
    ldm.write_single_file("sd1", marked, extra={"v_pred": torch.tensor([])})
    by_key = load_model(marked, config_dir=config_dir)
    assert by_key.prediction_type == "v_prediction"
    assert by_key.metadata["v_pred_source"] == "checkpoint key 'v_pred'"
    assert load_model(marked, config_dir=config_dir, v_pred=False).prediction_type == "epsilon"


def test_sdxl_v_pred_with_zero_terminal_snr(tmp_path):
    path = tmp_path / "vxl.safetensors"
    ldm.write_single_file("sdxl", path, extra={"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])})
    bundle = load_model(path, config_dir=ldm.write_config_dir("sdxl", tmp_path / "c"))
    assert bundle.prediction_type == "v_prediction"
    assert bundle.metadata["ztsnr"] is True
    assert bundle.noise_scheduler.config.rescale_betas_zero_snr is True
    assert float(bundle.noise_scheduler.alphas_cumprod[-1]) < 1e-6


def test_sd2_yaml_marks_v_prediction(tmp_path):
    path = tmp_path / "v2-768.safetensors"
    ldm.write_single_file("sd2", path)
    config_dir = ldm.write_config_dir("sd2", tmp_path / "c")
    assert load_model(path, config_dir=config_dir).prediction_type == "epsilon"
    path.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    bundle = load_model(path, config_dir=config_dir)
    assert bundle.prediction_type == "v_prediction"
    assert bundle.metadata["v_pred_source"] == "yaml next to the checkpoint"


def _lora_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "style_lora.safetensors"
    base = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{base}.lora_down.weight": torch.zeros(4, 32), f"{base}.lora_up.weight": torch.zeros(32, 4),
               f"{base}.alpha": torch.tensor(4.0)}, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def test_clear_errors_for_bad_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(ModelLoadError, match="model file not found: .*nothing.safetensors"):
        load_model(tmp_path / "nothing.safetensors")
    for fmt in ("safetensors", "ckpt"):
        whole = tmp_path / f"whole.{fmt}"
        ldm.write_single_file("sd1", whole, fmt)
        cut = tmp_path / f"cut.{fmt}"
        data = whole.read_bytes()
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(ModelLoadError, match=r"cut\.\w+ could not be read; the file may be incomplete"):
            load_model(cut)
    with pytest.raises(ModelLoadError, match="LoRA / LyCORIS network file.*lora_unet_down_blocks"):
        load_model(_lora_file(tmp_path))
    random = tmp_path / "random.safetensors"
    save_file({"weight": torch.randn(3, 3), "bias": torch.randn(3)}, str(random))
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion checkpoint.*first keys"):
        load_model(random)
    vae_only = ldm.save_state_dict(ldm.vae_to_ldm(tiny_vae(), prefix=""), tmp_path / "vae.safetensors")
    with pytest.raises(ModelLoadError, match="looks like a VAE file"):
        load_model(vae_only)
    # Tiny weights against the shipped full-size configs: a size mismatch, named.
    tiny = tmp_path / "tiny.safetensors"
    ldm.write_single_file("sd1", tiny)
    with pytest.raises(ModelLoadError, match="UNet weights of tiny.safetensors do not fit.*config_dir"):
        load_model(tiny)
    with pytest.raises(ModelLoadError, match="config_dir .* has no unet/config.json"):
        load_model(tiny, config_dir=tmp_path)


@pytest.mark.parametrize("shapes, message", [
    ({"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (6,)}, "SD3"),
    ({"double_blocks.0.img_attn.norm.key_norm.scale": (4,)}, "single-file Flux.1 transformer.*text encoder"),
    ({"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": (4,)}, "Flux.1 transformer needs"),
    ({"context_refiner.0.attention.k_norm.weight": (4,)}, "Z-Image transformer needs its text encoder"),
    ({ldm.UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 1280),
      "conditioner.embedders.0.model.positional_embedding": (77, 8)}, "SDXL refiner"),
    ({ldm.UNET + "input_blocks.0.0.weight": (320, 9, 3, 3),
      "cond_stage_model.transformer.text_model.final_layer_norm.weight": (8,)}, "inpainting"),
    ({ldm.UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 768)}, "no text encoder.*sd1"),
    ({ldm.UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 1024),
      "cond_stage_model.transformer.text_model.final_layer_norm.weight": (8,)}, "inconsistent.*sd1.*1024.*sd2"),
])
def test_unsupported_or_odd_checkpoints_are_named(tmp_path, shapes, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(ldm.keys_file(tmp_path / "odd.safetensors", shapes))


def test_lightning_ckpt_loads_but_foreign_objects_are_refused(tmp_path, monkeypatch):
    config_dir = ldm.write_config_dir("sd1", tmp_path / "c")
    parts = tiny_components("sd1")
    state = ldm.ldm_state_dict("sd1", parts)

    def fake_class(module_name, class_name):
        parts = module_name.split(".")
        for i in range(1, len(parts) + 1):  # pickle imports every parent package
            monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
        cls = type(class_name, (), {"__module__": module_name})
        setattr(sys.modules[module_name], class_name, cls)
        return cls

    checkpoint_cls = fake_class("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint")
    lightning = tmp_path / "lightning.ckpt"
    import numpy as np

    callbacks = {checkpoint_cls: {"best": checkpoint_cls(), "best_model_score": np.float64(0.5)}}
    torch.save({"state_dict": state, "callbacks": callbacks, "lr": [np.zeros(2)]}, lightning)
    payload_cls = fake_class("payload.module", "Payload")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": state, "extra": payload_cls()}, foreign)
    for name in [n for n in sys.modules if n.startswith(("pytorch_lightning", "payload"))]:
        monkeypatch.delitem(sys.modules, name)  # the loader must not need them

    bundle = load_model(lightning, config_dir=config_dir)
    torch.testing.assert_close(_unet_out(bundle.unet, "sd1"), _unet_out(parts["unet"], "sd1"), rtol=0, atol=1e-6)
    with pytest.raises(ModelLoadError, match="Python objects other than tensors.*payload.module.Payload"):
        load_model(foreign, config_dir=config_dir)


def test_standalone_host(tmp_path, monkeypatch):
    root = tmp_path / "models"
    ckpts = root / "Stable-Diffusion"
    (ckpts / "sub").mkdir(parents=True)
    ldm.write_single_file("sd1", ckpts / "sub" / "tiny.SAFETENSORS")
    for name in ("a.ckpt", "b.PT", "c.pth", "d.bin", "e.sft", "notes.txt", "preview.png"):
        (ckpts / name).write_bytes(b"x")
    save_tiny_diffusers("sd1", ckpts / "diffusers-model")
    (root / "VAE").mkdir()
    ldm.save_state_dict(ldm.vae_to_ldm(tiny_vae(), prefix=""), root / "VAE" / "tiny.vae.safetensors")
    host = StandaloneHost(root, config_dir=ldm.write_config_dir("sd1", tmp_path / "c"))
    assert isinstance(host, Host)
    with pytest.raises(ModelLoadError, match="model file not found: nope.safetensors"):
        host.check({"model": "nope.safetensors"})  # before anything loads
    with pytest.raises(ModelLoadError, match="VAE file not found: nope.pt"):
        host.check({"model": "sub/tiny.SAFETENSORS", "vae": "nope.pt"})
    host.check({"model": "sub/tiny.SAFETENSORS", "vae": "tiny.vae.safetensors"})
    assert host.list_models() == ["a.ckpt", "b.PT", "c.pth", "d.bin", "diffusers-model", "e.sft",
                                  "sub/tiny.SAFETENSORS"]
    assert host.list_vaes() == ["tiny.vae.safetensors"]
    bundle = host.load({"model": "sub/tiny.SAFETENSORS", "vae": "tiny.vae.safetensors", "model_v_pred": True})
    assert bundle.family.name == "sd1" and bundle.prediction_type == "v_prediction"
    assert bundle.metadata["vae"] == str(root / "VAE" / "tiny.vae.safetensors")
    assert host.load(types.SimpleNamespace(model="sub/tiny.SAFETENSORS", vae="None", model_v_pred=False)
                     ).prediction_type == "epsilon"
    with pytest.raises(ModelLoadError, match="No Model Selected"):
        host.load({"model": ""})
    with pytest.raises(ModelLoadError, match="model file not found: missing.safetensors.*Stable-Diffusion"):
        host.load({"model": "missing.safetensors"})

    monkeypatch.chdir(tmp_path)
    assert StandaloneHost().lora_dir() == tmp_path / "output"
    assert StandaloneHost(output_dir=tmp_path / "loras").lora_dir() == tmp_path / "loras"
    assert StandaloneHost().list_models() == []
    host.restore()
