"""Flux.1 and Z-Image: detection, layout, the flow-matching objective and its timestep convention
(checked against the diffusers pipelines' own schedulers), and files diffusers loads back exactly."""

from __future__ import annotations

import pytest
import torch

from helpers import TinyHost, image_folder, quick_config
from tiny_dit import tiny_dit_bundle, tiny_dit_components, tiny_flux_transformer
from trainer.cli import main
from trainer.families import FLUX, ZIMAGE, get_family
from trainer.training.control import TrainControl


# ----------------------------------------------------------------------------- detection

@pytest.mark.parametrize("shapes, family", [
    ({"double_blocks.0.img_attn.norm.key_norm.scale": (128,)}, "flux"),
    ({"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": (128,)}, "flux"),
    ({"single_transformer_blocks.0.proj_mlp.weight": (8, 4)}, "flux"),  # a diffusers-named transformer
    ({"context_refiner.0.attention.k_norm.weight": (128,)}, "zimage"),
    ({"model.diffusion_model.context_refiner.0.attention.k_norm.weight": (128,)}, "zimage"),
    ({"context_refiner.0.attention.norm_k.weight": (128,)}, "zimage"),
])
def test_transformer_families_detected_from_keys(tmp_path, shapes, family):
    import ldm
    from trainer.hosts.checkpoint_file import CheckpointFile, detect_family

    path = ldm.keys_file(tmp_path / "t.safetensors", shapes)
    assert detect_family(CheckpointFile(path)) == family


def test_diffusers_folders_name_their_family(tmp_path):
    from trainer.hosts.standalone import _folder_family

    assert _folder_family(tmp_path, {"_class_name": "FluxPipeline"}) == "flux"
    assert _folder_family(tmp_path, {"_class_name": "ZImagePipeline"}) == "zimage"


def _save_zimage_folder(folder):
    parts = tiny_dit_components("zimage")
    parts["unet"].save_pretrained(folder / "transformer")
    parts["vae"].save_pretrained(folder / "vae")
    parts["text_encoders"][0].save_pretrained(folder / "text_encoder")
    parts["tokenizers"][0].save_pretrained(folder / "tokenizer")
    parts["noise_scheduler"].save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text('{"_class_name": "ZImagePipeline"}')
    return parts


def test_flux_diffusers_folder_loads(tmp_path):
    from trainer.hosts.standalone import load_model

    folder = tmp_path / "flux"
    _save_flux_folder(folder, tiny_dit_components("flux"))
    bundle = load_model(folder)
    assert bundle.family is FLUX and [type(t).__name__ for t in bundle.text_encoders] == ["CLIPTextModel",
                                                                                         "T5EncoderModel"]
    assert bundle.noise_scheduler.config.use_dynamic_shifting
    from trainer.conditioning import PromptEncoder

    cond = PromptEncoder(bundle).encode(["a cat"])
    assert cond.pooled.shape == (1, 32) and cond.hidden.shape[1] == bundle.tokenizers[1].model_max_length


def test_diffusers_folder_round_trip(tmp_path):
    """A Z-Image diffusers folder (save_pretrained of every part) loads as a Z-Image bundle."""
    from trainer.hosts.standalone import load_model

    folder = tmp_path / "zi"
    parts = _save_zimage_folder(folder)
    bundle = load_model(folder)
    assert bundle.family is ZIMAGE and bundle.prediction_type == "flow"
    assert type(bundle.unet).__name__ == "ZImageTransformer2DModel"
    assert not bundle.noise_scheduler.config.use_dynamic_shifting and bundle.noise_scheduler.config.shift == 3.0
    for a, b in zip(parts["unet"].state_dict().values(), bundle.unet.state_dict().values()):
        assert torch.equal(a, b)


def _native_zimage_state(transformer) -> dict:
    """The tiny transformer's weights under the original Z-Image single-file names (fused qkv, out,
    q_norm/k_norm, final_layer, x_embedder, model.diffusion_model.), as the usual download has them."""
    out = {}
    state = transformer.state_dict()
    for key, value in state.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            parts = [state[key.replace(".to_q.", f".to_{p}.")] for p in "qkv"]
            key, value = key.replace(".to_q.", ".qkv."), torch.cat(parts)
        for new, old in ((".attention.out.", ".attention.to_out.0."), (".k_norm.", ".norm_k."), (".q_norm.", ".norm_q."),
                         ("final_layer.", "all_final_layer.2-1."), ("x_embedder.", "all_x_embedder.2-1.")):
            key = key.replace(old, new)
        out["model.diffusion_model." + key] = value.clone()
    return out


def test_single_file_zimage_with_a_text_encoder_folder(tmp_path):
    from safetensors.torch import save_file

    from trainer.hosts.base import ModelLoadError
    from trainer.hosts.standalone import StandaloneHost

    parts = _save_zimage_folder(tmp_path / "models" / "text_encoder" / "zi-parts")
    (tmp_path / "models" / "StableDiffusion").mkdir()
    save_file(_native_zimage_state(parts["unet"]), str(tmp_path / "models" / "StableDiffusion" / "zi.safetensors"))
    # the tiny model's own configs stand in for the shipped full-size ones
    host = StandaloneHost(tmp_path / "models", config_dir=tmp_path / "models" / "text_encoder" / "zi-parts")
    bundle = host.load({"model": "zi.safetensors", "te": "zi-parts", "vae": "None"})
    assert bundle.family is ZIMAGE and bundle.metadata["te"].endswith("zi-parts")
    for key, value in parts["unet"].state_dict().items():
        assert torch.equal(bundle.unet.state_dict()[key], value), key
    assert type(bundle.text_encoders[0]).__name__ == "Qwen3Model"
    # a Qwen3 folder (weights and tokenizer files together) also works as the Text Encoder, with a separate VAE
    parts["tokenizers"][0].save_pretrained(tmp_path / "models" / "text_encoder" / "zi-parts" / "text_encoder")
    parts["vae"].save_pretrained(tmp_path / "models" / "VAE" / "flux-vae")
    bundle = host.load({"model": "zi.safetensors", "te": "zi-parts/text_encoder", "vae": "flux-vae"})
    assert bundle.vae is not None and bundle.vae.config.latent_channels == 16
    with pytest.raises(ModelLoadError, match="needs its text encoder.*Text Encoder folder"):
        host.load({"model": "zi.safetensors", "te": "None", "vae": "None"})


@pytest.mark.slow
def test_standalone_host_trains_a_zimage_folder(tmp_path):
    from safetensors import safe_open

    from trainer.hosts.standalone import StandaloneHost
    from trainer.training.job import run_job

    _save_zimage_folder(tmp_path / "models" / "StableDiffusion" / "zimage-tiny")
    data = image_folder(tmp_path / "data", n=2)
    cfg = quick_config(lora_data_directory=str(data), model="zimage-tiny", train_iterations="2", save_lora_name="zi")
    host = StandaloneHost(tmp_path / "models", output_dir=tmp_path / "out")
    res = run_job(cfg, host=host, logs_dir=tmp_path / "logs")
    with safe_open(str(res.saved[-1]), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "zimage"
        assert all(k.startswith("diffusion_model.layers.") for k in f.keys())


# Parameter counts of the real models: Z-Image-Turbo's transformer file holds 6,154,908,736; Flux.1-dev
# 11,901,408,320; T5-XXL's encoder 4,762,310,656; Qwen3-4B without its LM head 4,022,468,096; the
# 16-channel VAE 83,819,683; CLIP-L 123,060,480.
@pytest.mark.parametrize("family, transformer, encoders", [
    ("zimage", 6_154_908_736, [4_022_468_096]),
    pytest.param("flux", 11_901_408_320, [123_060_480, 4_762_310_656], marks=pytest.mark.slow),
])
def test_shipped_configs_have_the_real_sizes(family, transformer, encoders):
    from trainer.hosts.meta import meta_parts

    parts = meta_parts(family)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(parts["unet"]) == transformer
    assert count(parts["vae"]) == 83_819_683
    assert [count(t) for t in parts["text_encoders"]] == encoders


# ----------------------------------------------------------------------------- layout

# sd-scripts' lora_flux.py wraps every Linear of the BFL DoubleStreamBlock (img/txt: mod.lin,
# attn.qkv, attn.proj, mlp.0, mlp.2 = 10) and SingleStreamBlock (linear1, linear2, modulation.lin
# = 3): 19 x 10 + 38 x 3 = 304 for Flux.1-dev. Z-Image: the 8 Linears of each of the 30 main layers
# (attention to_q/to_k/to_v/to_out.0, feed_forward w1/w2/w3, adaLN_modulation.0) = 240, the keys
# ComfyUI's z_image_to_diffusers map and diffusers' Z-Image converter read.
@pytest.mark.parametrize("family, args, expected", [
    ("zimage", [], 240),
    ("zimage", ["--blocks", "S00,S29"], 16),
    ("zimage", ["--element", "SelfAttention"], 120),
    pytest.param("flux", [], 304, marks=pytest.mark.slow),
    pytest.param("flux", ["--blocks", "D00,S37", "--network-type", "loha"], 13, marks=pytest.mark.slow),
    pytest.param("flux", ["--element", "CrossAttention"], 38, marks=pytest.mark.slow),
])
def test_layout_counts(family, args, expected, capsys):
    assert main(["layout", "--family", family, *args]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith(f"modules: {expected}  parameters: ")
    if family == "zimage":
        assert lines[0].startswith("diffusion_model.layers.")
    else:
        assert lines[0].startswith("lora_unet_double_blocks_0_") or lines[0].startswith("lora_unet_single_blocks_")


def test_flux_fused_layers_have_the_bfl_shapes(capsys):
    pytest.importorskip("diffusers")
    from trainer.hosts.meta import meta_bundle
    from trainer.network.network import NetworkSpec, create_network

    bundle = meta_bundle("zimage")
    net = create_network(bundle, NetworkSpec(rank=4, alpha=4, blocks=("S00",)))
    assert {m.file_name: m.weight_shape for m in net.all_modules}["diffusion_model.layers.0.attention.to_q"] == (3840, 3840)
    small = tiny_dit_bundle("flux")
    net = create_network(small, NetworkSpec(rank=4, alpha=4, blocks=FLUX.block_ids))
    shapes = {m.lora_name: m.weight_shape for m in net.all_modules}
    inner = small.unet.config.attention_head_dim * small.unet.config.num_attention_heads
    assert shapes["lora_unet_double_blocks_0_img_attn_qkv"] == (3 * inner, inner)
    assert shapes["lora_unet_single_blocks_0_linear1"] == (3 * inner + 4 * inner, inner)


# ----------------------------------------------------------------------------- objective

def test_flow_noising_target_and_no_min_snr():
    from trainer.training import losses

    bundle = tiny_dit_bundle("zimage")
    sched = bundle.noise_scheduler
    x0, eps = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    t = torch.tensor([0.0, 250.0, 1000.0])
    xt = losses.add_noise(sched, x0, eps, t)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[1], 0.75 * x0[1] + 0.25 * eps[1])
    torch.testing.assert_close(xt[2], eps[2])
    torch.testing.assert_close(losses.training_target(sched, x0, eps, t, "flow"), eps - x0)
    pred = torch.randn_like(x0)
    plain = losses.diffusion_loss(pred, eps, t, scheduler=sched)
    assert losses.diffusion_loss(pred, eps, t, scheduler=sched, snr_gamma=5.0) == plain


def test_flow_timestep_sampling_uses_the_family_shift():
    from trainer.training.losses import sample_timesteps

    zi, fx = tiny_dit_bundle("zimage").noise_scheduler, tiny_dit_bundle("flux").noise_scheduler
    gen = torch.Generator().manual_seed(0)
    t = sample_timesteps(4000, 0, 1000, fixed_in_batch=False, device="cpu", generator=gen, scheduler=zi)
    s = torch.sigmoid(torch.randn(4000, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(t / 1000, 3 * s / (1 + 2 * s))  # SPEC.md §4.6, Z-Image-Turbo's shift 3
    small = sample_timesteps(4000, 0, 1000, fixed_in_batch=False, device="cpu", scheduler=fx, latent_hw=(32, 32))
    large = sample_timesteps(4000, 0, 1000, fixed_in_batch=False, device="cpu", scheduler=fx, latent_hw=(128, 128))
    assert large.mean() > small.mean() + 50  # more tokens, more noise (resolution-dependent shift)
    ranged = sample_timesteps(64, 200, 400, fixed_in_batch=True, device="cpu", scheduler=zi)
    assert ranged.min() >= 200 and ranged.max() <= 400 and len(set(ranged.tolist())) == 1


class _Oracle:
    """Stands in for a transformer's forward: knows x0 and ε, so from a latent x = (1-σ)x0 + σε it
    reads σ, checks the time it was given against the family's convention, and returns what the
    family's model predicts for the true velocity (Flux: ε - x0; Z-Image: x0 - ε)."""

    def __init__(self, family, x0, eps):
        self.family, self.x0, self.eps, self.calls = family, x0, eps, 0

    def sigma_of(self, x):
        d = self.eps - self.x0
        return ((x - self.x0) * d).flatten(1).sum(1) / d.flatten(1).pow(2).sum(1)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.family == "flux":
            x, t = kwargs["hidden_states"], kwargs["timestep"]
            sigma = self.sigma_of(x.float())
            torch.testing.assert_close(t.float(), sigma, atol=1e-4, rtol=0)  # Flux is given σ
            return ((self.eps - self.x0).to(x.dtype),)
        frames, t = args[0], args[1]
        x = torch.stack(list(frames)).squeeze(2)
        sigma = self.sigma_of(x.float())
        torch.testing.assert_close(t.float(), 1 - sigma, atol=1e-4, rtol=0)  # Z-Image is given 1 - σ
        return (list((self.x0 - self.eps).unsqueeze(2).unbind(0)),)


def _pipeline(bundle):
    import diffusers

    if bundle.family.name == "flux":
        return diffusers.FluxPipeline(scheduler=bundle.noise_scheduler, vae=bundle.vae,
                                      text_encoder=bundle.text_encoders[0], tokenizer=bundle.tokenizers[0],
                                      text_encoder_2=bundle.text_encoders[1], tokenizer_2=bundle.tokenizers[1],
                                      transformer=bundle.unet)
    return diffusers.ZImagePipeline(scheduler=bundle.noise_scheduler, vae=bundle.vae, text_encoder=bundle.text_encoders[0],
                                    tokenizer=bundle.tokenizers[0], transformer=bundle.unet)


@pytest.mark.parametrize("family", ["flux", "zimage"])
def test_timestep_convention_matches_the_diffusers_pipeline(family, monkeypatch):
    """The pipeline's own scheduler and call, run with an oracle model, denoise ε to x0 exactly when
    the model follows our convention; our training call gives the oracle the same time."""
    from trainer.conditioning import PromptEncoder
    from trainer.modes.base import transformer_forward
    from trainer.training.losses import add_noise

    bundle = tiny_dit_bundle(family)
    pipe = _pipeline(bundle)
    cond = PromptEncoder(bundle).encode(["a cat"])
    gen = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(1, 16, 8, 8, generator=gen), torch.randn(1, 16, 8, 8, generator=gen)
    if family == "flux":
        pack = lambda v: v.view(1, 16, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 16, 64)  # noqa: E731
        oracle = _Oracle(family, pack(x0), pack(eps))
        monkeypatch.setattr(bundle.unet, "forward", oracle)
        out = pipe(prompt_embeds=cond.hidden, pooled_prompt_embeds=cond.pooled, latents=pack(eps), height=64,
                   width=64, num_inference_steps=4, output_type="latent").images
        torch.testing.assert_close(out, pack(x0), atol=1e-4, rtol=1e-4)
    else:
        oracle = _Oracle(family, x0, eps)
        monkeypatch.setattr(bundle.unet, "forward", oracle)
        out = pipe(prompt_embeds=[cond.hidden[0][cond.mask[0]]], latents=eps, height=64, width=64,
                   num_inference_steps=4, guidance_scale=0.0, output_type="latent").images
        torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)
    assert oracle.calls == 4
    # Training: the same time convention, and the prediction is the velocity ε - x0 (the loss target).
    t = torch.tensor([370.0])
    if family == "flux":
        oracle.x0, oracle.eps = pack(x0), pack(eps)
    pred = transformer_forward(bundle, add_noise(bundle.noise_scheduler, x0, eps, t), t, cond)
    torch.testing.assert_close(pred, eps - x0)


# ----------------------------------------------------------------------------- files diffusers loads

def _random_network(bundle, **spec):
    from trainer.network.network import NetworkSpec, create_network

    net = create_network(bundle, NetworkSpec(rank=4, alpha=2.0, blocks=bundle.family.block_ids, **spec))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return net


@pytest.mark.parametrize("family", ["flux", "zimage"])
def test_diffusers_loads_our_file_and_reproduces_the_network(family, tmp_path):
    pytest.importorskip("peft")
    from trainer.bundle import ModelBundle
    from trainer.conditioning import PromptEncoder
    from trainer.modes.base import transformer_forward
    from trainer.network.io import save_network

    parts = tiny_dit_components(family)
    if family == "flux":
        # diffusers' kohya-Flux converter splits linear1 with Flux.1's full widths (3072 x 3 + 12288), so
        # the tiny model has double blocks only; test_flux_linear1_at_full_width covers linear1.
        parts["unet"] = tiny_flux_transformer(double=2, single=0)
    bundle = ModelBundle(family=get_family(family), prediction_type="flow", **parts).freeze()
    net = _random_network(bundle)
    path = save_network(net, tmp_path / "net.safetensors", metadata={}, dtype=torch.float32)
    cond = PromptEncoder(bundle).encode(["a cat", "a dog on the grass"])
    gen = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 16, 8, 8, generator=gen), torch.tensor([300.0, 700.0])
    with torch.no_grad():
        base = transformer_forward(bundle, x, t, cond)
        net.apply_to()
        ours = transformer_forward(bundle, x, t, cond)
        net.remove()
    pipe = _pipeline(bundle)
    converted = type(pipe).lora_state_dict(str(path))
    converted = converted[0] if isinstance(converted, tuple) else converted
    modules = dict(bundle.unet.named_modules())
    targets = {k[len("transformer."):].rsplit(".lora_", 1)[0] for k in converted}
    assert all(k.startswith("transformer.") for k in converted)
    assert targets <= set(modules)  # 0 unexpected keys
    # 0 missing: every diffusers layer our network wraps is loaded
    assert targets == {p for m in net.all_modules for p in _paths(bundle.unet, m)}
    pipe.load_lora_weights(str(path), adapter_name="ours")
    with torch.no_grad():
        theirs = transformer_forward(bundle, x, t, cond)
    assert (ours - base).abs().max() > 1e-2
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)


def _paths(model, module):
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(layer)] for layer in module.org_modules]


def test_flux_linear1_at_full_width():
    """A single block's fused linear1 (q, k, v, mlp: 3072 x 3 + 12288 rows) as diffusers splits it:
    every part's delta is the rows of our fused delta."""
    from diffusers import FluxPipeline
    from torch import nn

    from trainer.network.layers import LoRAModule

    parts = [nn.Linear(3072, n, device="meta") for n in (3072, 3072, 3072, 12288)]
    module = LoRAModule("lora_unet_single_blocks_0_linear1", parts, 4, 2.0).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        module.lora_down.weight.copy_(torch.randn(4, 3072, generator=gen))
        module.lora_up.weight.copy_(torch.randn(21504, 4, generator=gen))
        module.alpha.fill_(2.0)
    state = {f"{module.lora_name}.{k}": v.detach().clone() for k, v in module.kohya_tensors().items()}
    converted = FluxPipeline.lora_state_dict(state)
    converted = converted[0] if isinstance(converted, tuple) else converted
    fused = module.lora_up.weight @ module.lora_down.weight * 0.5
    start = 0
    for name, rows in (("attn.to_q", 3072), ("attn.to_k", 3072), ("attn.to_v", 3072), ("proj_mlp", 12288)):
        key = f"transformer.single_transformer_blocks.0.{name}"
        delta = converted[f"{key}.lora_B.weight"] @ converted[f"{key}.lora_A.weight"]
        torch.testing.assert_close(delta, fused[start:start + rows], atol=1e-4, rtol=1e-4)
        start += rows
    assert len(converted) == 8


def test_zimage_file_keys_and_resume_round_trip(tmp_path):
    from trainer.network.io import save_network
    from trainer.network.network import NetworkSpec
    from trainer.network.resume import resume_network
    from safetensors.torch import load_file

    bundle = tiny_dit_bundle("zimage")
    net = _random_network(bundle)
    path = save_network(net, tmp_path / "zi.safetensors", metadata={}, dtype=torch.float32)
    keys = set(load_file(str(path)))
    assert "diffusion_model.layers.1.attention.to_out.0.lora_down.weight" in keys
    assert "diffusion_model.layers.0.adaLN_modulation.0.alpha" in keys
    assert all(k.startswith("diffusion_model.layers.") for k in keys)
    back = resume_network(bundle, NetworkSpec(rank=8, alpha=1.0), str(path))
    assert back.state_dict().keys() == net.state_dict().keys()
    for k, v in net.state_dict().items():
        assert torch.equal(v, back.state_dict()[k])
    # the original extension's spelling (".lora.down.weight") resumes too
    theirs = {k.replace(".lora_down.", ".lora.down.").replace(".lora_up.", ".lora.up."): v
              for k, v in load_file(str(path)).items()}
    again = resume_network(bundle, NetworkSpec(), theirs)
    for k, v in net.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])


# ----------------------------------------------------------------------------- training

def _losses(csv_path):
    import csv

    rows = list(csv.reader(open(csv_path, encoding="utf-8")))
    head = next(i for i, r in enumerate(rows) if r and r[0] == "Step")
    return [float(r[2]) for r in rows[head + 1:]]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "zimage"])
def test_lora_mode_loss_falls(family, tmp_path):
    from safetensors import safe_open

    from trainer.training.job import run_job

    data = image_folder(tmp_path / "data", n=2)
    cfg = quick_config(lora_data_directory=str(data), train_iterations="100", train_learning_rate="1e-2",
                       logging_save_csv=True, train_min_timesteps="300", train_max_timesteps="700",
                       save_lora_name=f"fall_{family}", lora_trigger_word="pat")
    logs = []
    result = run_job(cfg, host=TinyHost(family, tmp_path / "out"), logs_dir=tmp_path / "logs",
                     control=TrainControl(on_log=logs.append))
    losses = _losses(result.csv_paths[0])
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    # The velocity target ε - x0 keeps a large part no network can predict (the fresh noise), so the
    # fall is smaller than SD's; measured 0.73 (Flux) and 0.78 (Z-Image) of the first loss.
    assert last < 0.85 * first, (first, last)
    assert any("train_snr_gamma = 5.0 is ignored" in line for line in logs)
    with safe_open(str(result.saved[-1]), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    fam = get_family(family)
    assert meta["ss_base_model_version"] == fam.base_model_version
    assert meta["modelspec.architecture"] == f"{fam.modelspec_architecture}/lora"
    assert "modelspec.prediction_type" not in meta
    prefix = "lora_unet_double_blocks_0_" if family == "flux" else "diffusion_model.layers.0."
    assert any(k.startswith(prefix) for k in keys)


def _pairs(tmp_path):
    from helpers import pattern_image

    orig = str(pattern_image(tmp_path / "orig.png", 1))
    target = str(pattern_image(tmp_path / "target.png", 7))
    data = tmp_path / "pairs"
    data.mkdir()
    for i in range(2):
        pattern_image(data / f"img{i}.png", i)
        pattern_image(data / f"img{i}_closed.png", i + 10)
    return orig, target, data


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "zimage"])
def test_every_mode_trains(family, tmp_path):
    from safetensors.torch import load_file

    from trainer.training.job import run_job

    orig, target, data = _pairs(tmp_path)
    cases = {
        "ileco": dict(mode="iLECO", original_prompt="a photo of a cat", target_prompt="a photo of a dog"),
        "ileco_traj": dict(mode="iLECO", original_prompt="a cat", target_prompt="a dog", ileco_latents="trajectory"),
        "diff": dict(mode="Difference", original_image=orig, target_image=target, diff_save_1st_pass=True),
        "addift": dict(mode="ADDifT", original_image=orig, target_image=target, train_batch_size="1"),
        "multi": dict(mode="Multi-ADDifT", lora_data_directory=str(data), diff_target_name="_closed",
                      diff_use_diff_mask=True),
    }
    for name, settings in cases.items():
        cfg = quick_config(train_iterations="3", save_lora_name=name, **settings)
        res = run_job(cfg, host=TinyHost(family, tmp_path / "out"), logs_dir=tmp_path / "logs")
        expected = ["diff_copy.safetensors", "diff.safetensors"] if name == "diff" else [f"{name}.safetensors"]
        assert [p.name for p in res.saved] == expected, name
        ups = [v for k, v in load_file(str(res.saved[-1])).items() if "lora_up" in k]
        assert ups and max(v.abs().max().item() for v in ups) > 0, name


@pytest.mark.slow
def test_ileco_moves_the_original_prediction_toward_the_target(tmp_path):
    from trainer.conditioning import PromptEncoder
    from trainer.modes.base import repeat_cond, transformer_forward
    from trainer.network.network import NetworkSpec
    from trainer.network.resume import resume_network
    from trainer.training.job import run_job

    cfg = quick_config(mode="iLECO", original_prompt="a photo of a cat", target_prompt="a photo of a dog",
                       train_iterations="60", train_learning_rate="5e-3", save_lora_name="ileco")
    res = run_job(cfg, host=TinyHost("zimage", tmp_path), logs_dir=tmp_path / "logs")
    bundle = tiny_dit_bundle("zimage")
    net = resume_network(bundle, NetworkSpec(), str(res.saved[-1]))
    net.apply_to()
    enc = PromptEncoder(bundle)
    c_o, c_t = enc.encode(["a photo of a cat"]), enc.encode(["a photo of a dog"])
    gen = torch.Generator().manual_seed(7)
    x, t = torch.randn(6, 16, 8, 8, generator=gen), torch.randint(0, 1000, (6,), generator=gen)

    @torch.no_grad()
    def distance(m):
        net.multiplier = 0.0
        b = transformer_forward(bundle, x, t, repeat_cond(c_t, 6))
        net.multiplier = m
        return (transformer_forward(bundle, x, t, repeat_cond(c_o, 6)) - b).pow(2).mean().item()

    before, after = distance(0.0), distance(1.0)
    assert after < 0.5 * before, (before, after)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "zimage"])
def test_stop_and_resume_match_an_uninterrupted_run(family, tmp_path):
    from safetensors.torch import load_file

    from trainer.training.job import run_job

    data = image_folder(tmp_path / "data", n=3)
    common = dict(lora_data_directory=str(data), train_iterations="8", train_lr_scheduler="cosine")
    full = run_job(quick_config(save_lora_name="full", **common), host=TinyHost(family, tmp_path / "a"),
                   logs_dir=tmp_path / "logs")
    stop = TrainControl()

    def stop_at_3(event):
        if event.step == 3 and not event.message:
            stop.stop()

    stop.listen(on_progress=stop_at_3)
    cfg = quick_config(save_lora_name="part", **common)
    first = run_job(cfg, host=TinyHost(family, tmp_path / "b"), logs_dir=tmp_path / "logs", control=stop)
    assert first.stopped and first.steps == 3
    second = run_job(cfg, host=TinyHost(family, tmp_path / "b"), logs_dir=tmp_path / "logs", resume=True)
    assert not second.stopped and second.steps == 8
    a, b = load_file(str(full.saved[-1])), load_file(str(second.saved[-1]))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("family", ["flux", "zimage"])
def test_gradient_checkpointing_gives_the_same_gradients(family):
    from trainer.conditioning import PromptEncoder
    from trainer.modes.base import transformer_forward

    bundle = tiny_dit_bundle(family)
    net = _random_network(bundle)
    net.apply_to()
    cond = PromptEncoder(bundle).encode(["a cat", "a dog"])
    gen = torch.Generator().manual_seed(4)
    x, t = torch.randn(2, 16, 8, 8, generator=gen), torch.tensor([200.0, 800.0])

    def grads():
        net.zero_grad()
        transformer_forward(bundle, x, t, cond).pow(2).mean().backward()
        return [p.grad.clone() for p in net.parameters()]

    plain = grads()
    bundle.unet.enable_gradient_checkpointing()
    checkpointed = grads()
    assert any(g.abs().sum() > 0 for g in plain)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_an_incomplete_transformer_file_is_named(tmp_path):
    import ldm
    from trainer.hosts.base import ModelLoadError
    from trainer.hosts.standalone import load_model

    path = ldm.keys_file(tmp_path / "cut.safetensors", {"double_blocks.0.img_attn.norm.key_norm.scale": (128,)})
    with pytest.raises(ModelLoadError, match="cut.safetensors is not a complete flux transformer"):
        load_model(path, te_path=tmp_path)
    with pytest.raises(ModelLoadError, match="Text Encoder .* is not a folder"):
        load_model(path, te_path=tmp_path / "nothing")


@pytest.mark.parametrize("family", ["flux", "zimage"])
def test_loha_on_the_transformers(family, tmp_path):
    """LoHa on fused and plain modules: ΔW has the fused layer's shape, each part adds its rows, and
    the file holds one hada_* set per saved module name."""
    pytest.importorskip("lycoris")
    from safetensors.torch import load_file

    from trainer.conditioning import PromptEncoder
    from trainer.modes.base import transformer_forward
    from trainer.network.io import save_network

    bundle = tiny_dit_bundle(family)
    net = _random_network(bundle, network_type="loha")
    names = {m.file_name for m in net.all_modules}
    keys = set(load_file(str(save_network(net, tmp_path / "h.safetensors", metadata={}, dtype=torch.float32))))
    assert keys == {f"{n}.{k}" for n in names for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha")}
    if family == "flux":
        qkv = net.get_submodule("lora_unet_double_blocks_0_img_attn_qkv")
        assert tuple(qkv.diff_weight().shape) == qkv.weight_shape and len(qkv.org_modules) == 3
    cond = PromptEncoder(bundle).encode(["a cat"])
    x, t = torch.randn(1, 16, 8, 8), torch.tensor([500.0])
    with torch.no_grad():
        base = transformer_forward(bundle, x, t, cond)
    net.apply_to()
    out = transformer_forward(bundle, x, t, cond)
    out.pow(2).mean().backward()
    assert (out - base).abs().max() > 1e-3
    assert all(p.grad is not None for p in net.parameters())


def test_settings_may_name_transformer_blocks():
    from trainer.config import ConfigError
    from trainer.network.network import effective_blocks

    cfg = quick_config(network_blocks="D00,S05,BASE")
    assert list(cfg.network_blocks) == ["BASE", "D00", "S05"]
    assert effective_blocks(FLUX, cfg.network_blocks) == ("BASE", "D00", "S05")
    assert effective_blocks(ZIMAGE, cfg.network_blocks) == ("BASE", "D00", "S05")  # S05 is a Z-Image block too
    assert effective_blocks(ZIMAGE, ["BASE", "IN01"]) == ZIMAGE.block_ids  # an SD list: every block
    with pytest.raises(ConfigError, match="D19.*Flux.1: CLIP T5 IN D00-D18"):
        quick_config(network_blocks="D19")


# ----------------------------------------------------------------------------- text encoders

def _te_network(bundle, blocks=("CLIP", "T5", "D00")):
    from trainer.network.network import NetworkSpec, create_network

    return create_network(bundle, NetworkSpec(rank=4, alpha=2.0, blocks=blocks, train_text_encoder=True))


def test_flux_text_encoders_get_kohya_modules_that_train(tmp_path):
    """CLIP-L and T5 modules (selected by their block ids) carry sd-scripts' lora_flux.py names, get
    gradients through the live prompt encoding, change when stepped, and resume from their file."""
    from safetensors.torch import load_file

    from trainer.conditioning import PromptEncoder
    from trainer.modes.base import transformer_forward
    from trainer.network.io import save_network
    from trainer.network.network import NetworkSpec
    from trainer.network.resume import resume_network

    bundle = tiny_dit_bundle("flux")
    net = _te_network(bundle)
    names = {m.file_name for m in net.te_modules}
    clip = {n for n in names if n.startswith("lora_te1_")}
    t5 = {n for n in names if n.startswith("lora_te3_")}
    assert clip | t5 == names
    # CLIP-L: q, k, v, out_proj, fc1, fc2 per layer; T5: q, k, v, o, wi_0, wi_1, wo per block (2 layers each here)
    assert len(clip) == 2 * 6 and len(t5) == 2 * 7
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in clip
    assert {"lora_te3_encoder_block_1_layer_0_SelfAttention_o", "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_1"} <= t5
    assert {m.block for m in net.te_modules} == {"CLIP", "T5"}
    with torch.no_grad():
        for m in net.all_modules:
            m.lora_up.weight.normal_(0, 0.1)
    net.apply_to()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    cond = PromptEncoder(bundle).encode(["a cat", "a dog"])  # live: gradients reach the encoders' modules
    x, t = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([300.0, 600.0])
    transformer_forward(bundle, x, t, cond).pow(2).mean().backward()
    for m in net.te_modules:
        assert m.lora_down.weight.grad is not None and m.lora_down.weight.grad.abs().sum() > 0, m.lora_name
    opt.step()
    changed = {k.split(".")[0] for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    assert {m.lora_name for m in net.te_modules} <= changed
    net.remove()
    path = save_network(net, tmp_path / "te.safetensors", metadata={}, dtype=torch.float32)
    keys = set(load_file(str(path)))
    assert "lora_te1_text_model_encoder_layers_1_mlp_fc2.alpha" in keys
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight" in keys
    back = resume_network(bundle, NetworkSpec(blocks=("CLIP", "T5", "D00"), train_text_encoder=True), str(path))
    assert back.state_dict().keys() == net.state_dict().keys() and not back.skipped_modules
    for k, v in net.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    # a setting that names no text encoder leaves the file's text-encoder modules out
    unet_only = resume_network(bundle, NetworkSpec(blocks=("D00",), train_text_encoder=True), str(path))
    assert not unet_only.te_modules and set(unet_only.skipped_modules) == names


def test_text_encoders_train_only_when_named():
    """The SD block list (with BASE) on Flux trains every transformer block and no text encoder; CLIP
    alone trains CLIP-L and nothing else of the encoders; outside LoRA mode nothing is trained there."""
    from trainer.modes.base import trains_text_encoder
    from trainer.network.network import NetworkSpec, create_network

    bundle = tiny_dit_bundle("flux")
    sd_list = create_network(bundle, NetworkSpec(rank=4, alpha=2.0, train_text_encoder=True))
    assert not sd_list.te_modules and sd_list.unet_modules
    clip_only = _te_network(bundle, blocks=("CLIP",))
    assert clip_only.te_modules and not clip_only.unet_modules
    assert all(m.lora_name.startswith("lora_te1_") for m in clip_only.te_modules)
    assert trains_text_encoder(quick_config(network_blocks="CLIP,D00"))
    assert not trains_text_encoder(quick_config(mode="iLECO", original_prompt="a", network_blocks="CLIP,D00"))


def test_zimage_text_encoder_is_refused_with_the_reason():
    from trainer.config import ConfigError
    from trainer.network.network import NetworkSpec, create_network

    with pytest.raises(ConfigError, match="QWEN3.*cannot be trained.*ComfyUI and Forge Neo"):
        quick_config(network_blocks="QWEN3,S00")
    quick_config(mode="iLECO", original_prompt="a cat", network_blocks="QWEN3,S00")  # trains no text encoder
    with pytest.raises(ValueError, match="remove QWEN3 from network_blocks"):
        create_network(tiny_dit_bundle("zimage"), NetworkSpec(blocks=("QWEN3", "S00"), train_text_encoder=True))
    assert main(["layout", "--family", "zimage", "--blocks", "QWEN3,S00"]) == 2


@pytest.mark.slow
def test_layout_lists_the_flux_text_encoders(capsys):
    """sd-scripts' lora_flux.py on CLIP-L (12 layers x q, k, v, out_proj, fc1, fc2 = 72) and T5-XXL's
    encoder (24 blocks x q, k, v, o, wi_0, wi_1, wo = 168)."""
    assert main(["layout", "--family", "flux", "--blocks", "CLIP,T5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("modules: 240  parameters: ")
    names = [line.split()[0] for line in lines[:-2]]
    assert sum(n.startswith("lora_te1_text_model_encoder_layers_") for n in names) == 72
    assert sum(n.startswith("lora_te3_encoder_block_") for n in names) == 168
    assert "lora_te3_encoder_block_23_layer_1_DenseReluDense_wo" in names


@pytest.mark.slow
def test_a_flux_lora_run_trains_the_named_text_encoders(tmp_path):
    from safetensors.torch import load_file

    from trainer.training.job import run_job

    data = image_folder(tmp_path / "data", n=2)
    logs = []
    cfg = quick_config(lora_data_directory=str(data), train_iterations="2", network_blocks="CLIP,T5,D00",
                       save_lora_name="te_run")
    res = run_job(cfg, host=TinyHost("flux", tmp_path / "out"), logs_dir=tmp_path / "logs",
                  control=TrainControl(on_log=logs.append))
    keys = load_file(str(res.saved[-1]))
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te3_") for k in keys)
    assert all(k.startswith(("lora_te1_", "lora_te3_", "lora_unet_double_blocks_0_")) for k in keys)
    assert max(v.abs().max().item() for k, v in keys.items() if k.startswith("lora_te") and "lora_up" in k) > 0
    assert any("encoded at every step" in line for line in logs)


@pytest.mark.slow
def test_a_flux_run_training_one_encoder_caches_the_others_outputs_and_frees_it(tmp_path, monkeypatch):
    """CLIP alone trains: T5's outputs are cached once, T5 leaves (meta), only CLIP encodes at each step,
    and the trained weights are those of encoding both at every step with both kept (the earlier way)."""
    from safetensors.torch import load_file

    import trainer.modes.lora as lora_mode
    from trainer.conditioning import PromptEncoder
    from trainer.training.job import run_job

    data = image_folder(tmp_path / "data", n=2)
    cfg = dict(lora_data_directory=str(data), train_iterations="3", network_blocks="CLIP,D00")
    calls, devices = [], {}
    real_part, real_release = PromptEncoder.flux_part, lora_mode.release_unused

    def spy_release(ctx, **kw):
        real_release(ctx, **kw)
        if "keep_encoder" in kw:
            devices.update({i: next(e.parameters()).device.type for i, e in enumerate(ctx.bundle.text_encoders)})

    monkeypatch.setattr(PromptEncoder, "flux_part", lambda self, prompts, part: calls.append(part) or
                        real_part(self, prompts, part))
    monkeypatch.setattr(lora_mode, "release_unused", spy_release)
    logs = []
    res = run_job(quick_config(**cfg, save_lora_name="cached"), host=TinyHost("flux", tmp_path / "out"),
                  logs_dir=tmp_path / "logs", control=TrainControl(on_log=logs.append))
    cached = load_file(str(res.saved[-1]))
    assert any("T5 text encoder's outputs are cached" in line for line in logs), logs
    assert devices == {0: "cpu", 1: "meta"}  # T5 released, CLIP kept
    last_t5 = len(calls) - 1 - calls[::-1].index("T5")
    assert calls[last_t5 + 1:].count("CLIP") >= 3 and "T5" not in calls[last_t5 + 1:]  # the steps: CLIP only

    monkeypatch.setattr(lora_mode, "release_unused", lambda ctx, **kw: None if "keep_encoder" in kw
                        else real_release(ctx, **kw))
    monkeypatch.setattr(lora_mode.LoraTask, "conditioning",
                        lambda self, idx: self.ctx.encoder.encode([self.prompts[i] for i in idx]))
    res = run_job(quick_config(**cfg, save_lora_name="every_step"), host=TinyHost("flux", tmp_path / "out2"),
                  logs_dir=tmp_path / "logs2")
    every = load_file(str(res.saved[-1]))
    assert cached.keys() == every.keys() and any(k.startswith("lora_te1_") for k in cached)
    for key in cached:
        assert torch.allclose(cached[key], every[key], rtol=1e-4, atol=1e-6), key


# ----------------------------------------------------------------------------- Flux.1-schnell

def _save_flux_folder(folder, parts):
    parts["unet"].save_pretrained(folder / "transformer")
    parts["vae"].save_pretrained(folder / "vae")
    for i, (te, tok) in enumerate((("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))):
        parts["text_encoders"][i].save_pretrained(folder / te)
        parts["tokenizers"][i].save_pretrained(folder / tok)
    parts["noise_scheduler"].save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')


def test_flux_schnell_is_told_from_dev_by_its_missing_guidance_embedding(tmp_path):
    """schnell has no guidance_in weights: detected in a single file (against dev's config) and in a
    diffusers folder; it samples with a fixed shift of 1, is called without guidance, and its files
    say flux-1-schnell."""
    from safetensors.torch import save_file

    from trainer.hosts.dit_parts import flow_scheduler, has_guidance_embedding
    from trainer.hosts.standalone import load_model
    from trainer.training.losses import sample_timesteps

    assert has_guidance_embedding(["guidance_in.in_layer.weight", "img_in.weight"])
    assert has_guidance_embedding(["time_text_embed.guidance_embedder.linear_1.weight"])
    assert not has_guidance_embedding(["time_text_embed.timestep_embedder.linear_1.weight", "double_blocks.0.x"])
    dev = tiny_dit_components("flux")
    config_dir = tmp_path / "dev-configs"  # what a single file is read with: dev's configs
    _save_flux_folder(config_dir, dev)
    torch.manual_seed(0)
    schnell = dict(dev, unet=type(dev["unet"]).from_config({**dev["unet"].config, "guidance_embeds": False}),
                   noise_scheduler=flow_scheduler({**dev["noise_scheduler"].config, "use_dynamic_shifting": False,
                                                   "shift": 1.0}))
    folder = tmp_path / "schnell"
    _save_flux_folder(folder, schnell)
    from_folder = load_model(folder)
    file = tmp_path / "flux1-schnell.safetensors"
    save_file({k: v.contiguous() for k, v in schnell["unet"].state_dict().items()}, str(file))
    from_file = load_model(file, te_path=folder, config_dir=config_dir)
    for bundle in (from_folder, from_file):
        fam = bundle.family
        assert fam.name == "flux" and fam.variant == "schnell" and not bundle.unet.config.guidance_embeds
        assert fam.modelspec_arch(False) == "flux-1-schnell/lora" and fam.base_model_version == "flux1"
        cfg = bundle.noise_scheduler.config
        assert not cfg.use_dynamic_shifting and cfg.shift == 1.0
        t = sample_timesteps(2000, 0, 1000, fixed_in_batch=False, device="cpu", scheduler=bundle.noise_scheduler,
                             generator=torch.Generator().manual_seed(0), latent_hw=(128, 128))
        s = torch.sigmoid(torch.randn(2000, generator=torch.Generator().manual_seed(0)))
        torch.testing.assert_close(t / 1000, s)  # shift 1: the logit-normal σ as it is, at any resolution
    for key, value in schnell["unet"].state_dict().items():
        assert torch.equal(from_file.unet.state_dict()[key], value), key
    dev_bundle = load_model(config_dir)
    assert dev_bundle.family.variant == "dev" and dev_bundle.family.modelspec_arch(False) == "flux-1-dev/lora"


# ----------------------------------------------------------------------------- load check after a save

@pytest.mark.parametrize("family", ["flux", "zimage"])
def test_the_load_check_runs_the_family_pipeline(family, tmp_path):
    """check_file loads a saved Flux / Z-Image file with the family's diffusers pipeline into a weightless
    copy: every module loads (a fused qkv counts once, when all its parts got the LoRA); Flux's T5
    modules are named as not read by diffusers; a renamed key is reported."""
    pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file

    from trainer.bundle import ModelBundle
    from trainer.network.io import save_network
    from trainer.network.network import NetworkSpec, create_network
    from trainer.training.loadcheck import check_file

    parts = tiny_dit_components(family)
    blocks = ("D00", "D01") if family == "flux" else ZIMAGE.block_ids[1:]
    if family == "flux":  # diffusers splits linear1 with Flux.1's full widths: double blocks only here
        parts["unet"] = tiny_flux_transformer(double=2, single=0)
        blocks = ("CLIP", "T5") + blocks
    bundle = ModelBundle(family=get_family(family), prediction_type="flow", **parts).freeze()
    net = create_network(bundle, NetworkSpec(rank=4, alpha=2.0, blocks=blocks, train_text_encoder=True))
    path = save_network(net, tmp_path / "n.safetensors", metadata={}, dtype=torch.float32)
    check = check_file(path, bundle)
    assert (check.error, check.unmatched) == ("", []), check.summary()
    t5 = sum(m.lora_name.startswith("lora_te3_") for m in net.all_modules)
    assert check.modules == check.file_modules == len(net.all_modules) - t5 and check.ok, check.summary()
    if family == "flux":
        assert t5 and f"{t5} module(s) not checked" in check.summary() and check.modules > len(net.unet_modules)
    bad = {k.replace("to_out.0", "to_zz") if "layers.0." in k else k.replace("img_mlp_0", "img_mlp_9"): v
           for k, v in load_file(str(path)).items()}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    assert not check_file(tmp_path / "bad.safetensors", bundle).ok


# ----------------------------------------------------------------------------- previews

@pytest.mark.parametrize("family", ["flux", "zimage"])
def test_previews_render_on_the_flow_families(family):
    """render() samples Flux / Z-Image with Euler on the velocity: same seed, same image; the network
    changes it; the run's random state is left alone by the Previewer (render is called inside it)."""
    import numpy as np

    from trainer.training.previews import render

    bundle = tiny_dit_bundle(family)
    kwargs = dict(seed=3, size=(32, 48), steps=4)
    first = render(bundle, ["a cat", "a dog"], **kwargs)
    assert [im.size for im in first] == [(48, 32), (48, 32)]
    again = render(bundle, ["a cat"], **kwargs)
    assert np.array_equal(np.asarray(again[0]), np.asarray(first[0]))
    net = _random_network(bundle)
    net.apply_to()
    with_net = render(bundle, ["a cat"], **kwargs)
    net.remove()
    assert not np.array_equal(np.asarray(with_net[0]), np.asarray(first[0]))


def test_flow_euler_is_the_flow_schedulers_step():
    """losses.flow_euler takes the step diffusers' FlowMatchEulerDiscreteScheduler takes."""
    from trainer.training.losses import flow_euler

    sched = tiny_dit_bundle("zimage").noise_scheduler
    sched.set_timesteps(5)
    x = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    v = lambda x, i: torch.sin(x + i)  # noqa: E731
    theirs = x.clone()
    for i, t in enumerate(sched.timesteps):
        theirs = sched.step(v(theirs, i), t, theirs).prev_sample
    ours = flow_euler(x, sched.sigmas.tolist(), v)
    torch.testing.assert_close(ours, theirs)
