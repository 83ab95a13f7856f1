"""Standalone loading at full size: the shipped SD1.5 / SD2.1 / SDXL configs and a real-size file.

The shipped configs must build modules with the public parameter counts and take a full-size LDM
key set (names and shapes, on the meta device); one full-architecture SD1.5 file with random
weights is written and loaded end to end, offline (about 15 s, 7 GB peak memory).
"""

from __future__ import annotations

import pytest
import torch

import ldm
from trainer.hosts.standalone import load_model
from trainer.hosts.meta import meta_parts

KINDS = ("sd1", "sd2", "sdxl")


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test: loading must never reach a hub."""
    ldm.block_network(monkeypatch)


# Parameter counts of the public models, obtained by instantiating the public diffusers /
# transformers configs of runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1 and
# stabilityai/stable-diffusion-xl-base-1.0 (SD1.5 UNet 859.52M and SDXL UNet 2.567B are the
# figures those model cards and the SDXL report quote).
FULL_SIZE = {
    "sd1": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd2": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
}


def _count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("family", KINDS)
def test_shipped_configs_take_full_size_checkpoint_keys(family):
    """Shipped configs have the public sizes, and a full-size LDM key set converts into them exactly."""
    from trainer.hosts.components import TEXT_ENCODERS, ConfigFolders
    from trainer.hosts.ldm_convert import build_text_encoder, build_unet, build_vae

    parts = meta_parts(family)
    names = ["text_encoder", "text_encoder_2"]
    counts = {"unet": _count(parts["unet"]), "vae": _count(parts["vae"]),
              **{n: _count(te) for n, te in zip(names, parts["text_encoders"])}}
    assert counts == FULL_SIZE[family]
    assert parts["vae"].config.scaling_factor == (0.13025 if family == "sdxl" else 0.18215)

    state = ldm.ldm_state_dict(family, parts)  # meta tensors: names and shapes only
    if family == "sd2":  # real SD2 files hold a 24th OpenCLIP block that the 23-layer encoder leaves out
        block = "cond_stage_model.model.transformer.resblocks."
        last = {k: v for k, v in state.items() if k.startswith(block + "22.")}
        state.update({k.replace(block + "22.", block + "23."): v for k, v in last.items()})
    folders = ConfigFolders(family)
    assert _count(build_unet(state, folders.json("unet"))) == counts["unet"]
    assert _count(build_vae(state, folders.json("vae"))) == counts["vae"]
    for name, slot in zip(names, TEXT_ENCODERS[family]):
        te = build_text_encoder(state, folders.folder(slot.subfolder) / "config.json", layout=slot.layout,
                                ldm_prefix=slot.ldm_prefix)
        assert _count(te) == counts[name]
    if family == "sdxl":
        assert type(te).__name__ == "CLIPTextModelWithProjection"
        assert parts["unet"].config.addition_embed_type == "text_time"
    if family == "sd2":
        assert parts["unet"].config.upcast_attention and parts["unet"].config.use_linear_projection


@pytest.mark.parametrize("width, te_key, family", [
    (768, "cond_stage_model.transformer.text_model.final_layer_norm.weight", "sd1"),
    (1024, "cond_stage_model.model.ln_final.weight", "sd2"),
    (2048, "conditioner.embedders.1.model.ln_final.weight", "sdxl"),
])
def test_detect_family_of_full_size_key_sets(tmp_path, width, te_key, family):
    from trainer.hosts.checkpoint_file import WIDTH_KEY, CheckpointFile, detect_family

    path = ldm.keys_file(tmp_path / "m.safetensors", {WIDTH_KEY: (640, width), te_key: (8,)})
    assert detect_family(CheckpointFile(path)) == family


def _random_ldm_state(kind: str, pool_size: int) -> dict:
    """A full-size LDM state dict of random fp16 values: distinct slices of one shared random
    pool per tensor (far faster to make than one randn per tensor)."""
    names = ldm.ldm_state_dict(kind, meta_parts(kind))
    pool = torch.randn(pool_size, generator=torch.Generator().manual_seed(0)).mul_(0.02).half()
    state = {}
    for i, (key, like) in enumerate(names.items()):
        if not like.dtype.is_floating_point:
            state[key] = torch.arange(77)[None]
            continue
        start = (i * 7_919_999) % (pool.numel() - like.numel())
        state[key] = pool[start:start + like.numel()].view(like.shape).clone()
    return state


@pytest.mark.slow
@pytest.mark.xdist_group("full_size")  # one full-size model in memory at a time (test_memory too)
def test_full_size_sd15_single_file_loads_offline(tmp_path, no_network):
    """A full-architecture SD1.5 file (random fp16 weights, 2.1 GB) through the shipped configs."""
    from safetensors.torch import save_file

    state = _random_ldm_state("sd1", 40_000_000)
    path = tmp_path / "sd15-full.safetensors"
    save_file(state, str(path))
    u, v, t = ldm.UNET, ldm.VAE, "cond_stage_model.transformer.text_model."
    checked = {k: state[k] for k in (u + "input_blocks.0.0.weight", u + "output_blocks.11.1.proj_out.weight",
                                     u + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
                                     v + "decoder.up.3.block.0.conv1.weight", v + "encoder.mid.attn_1.q.weight",
                                     t + "encoder.layers.11.mlp.fc2.weight")}
    del state  # keep the peak memory to the loader's own

    bundle = load_model(path)
    assert bundle.family.name == "sd1" and bundle.metadata["config_dir"] == "the shipped sd1 configs"
    assert sum(p.numel() for p in bundle.unet.parameters()) == FULL_SIZE["sd1"]["unet"]
    for module in (bundle.unet, bundle.vae, *bundle.text_encoders):
        assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in module.parameters())
    te = bundle.text_encoders[0]
    te = te if hasattr(te, "encoder") else te.text_model  # transformers 5 flattened CLIPTextModel
    pairs = [
        (bundle.unet.conv_in.weight, checked[u + "input_blocks.0.0.weight"]),
        (bundle.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight,
         checked[u + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"]),
        (bundle.unet.up_blocks[3].attentions[2].proj_out.weight, checked[u + "output_blocks.11.1.proj_out.weight"]),
        (bundle.vae.decoder.up_blocks[0].resnets[0].conv1.weight, checked[v + "decoder.up.3.block.0.conv1.weight"]),
        (bundle.vae.encoder.mid_block.attentions[0].to_q.weight,
         checked[v + "encoder.mid.attn_1.q.weight"][:, :, 0, 0]),
        (te.encoder.layers[11].mlp.fc2.weight, checked[t + "encoder.layers.11.mlp.fc2.weight"]),
    ]
    for got, want in pairs:
        assert torch.equal(got, want.float())
    with torch.no_grad():
        out = bundle.unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 768)).sample
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


@pytest.mark.slow
@pytest.mark.xdist_group("full_size")
def test_full_size_sdxl_single_file_loads_offline(tmp_path, no_network):
    """A full-architecture SDXL file (random fp16 weights, ~6.9 GB) loads offline in fp16."""
    from safetensors.torch import save_file

    state = _random_ldm_state("sdxl", 80_000_000)
    path = tmp_path / "sdxl-full.safetensors"
    probe = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    expected = state[probe].clone()
    save_file(state, str(path))
    del state

    bundle = load_model(path, dtype=torch.float16)
    assert bundle.family.name == "sdxl" and len(bundle.text_encoders) == 2
    assert sum(p.numel() for p in bundle.unet.parameters()) == FULL_SIZE["sdxl"]["unet"]
    got = bundle.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight
    assert torch.equal(got, expected)
