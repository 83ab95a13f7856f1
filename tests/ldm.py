"""Test helper: tiny diffusers components written as LDM-keyed single-file checkpoints.

The loader converts LDM keys with diffusers' converters; this module goes the other way
(diffusers/transformers names -> the LDM names that downloaded ``.safetensors``/``.ckpt`` files
use), written from the LDM layout: ``input_blocks``/``middle_block``/``output_blocks`` for the
UNet, ``encoder.down.N.block.M`` for the VAE, ``cond_stage_model``/``conditioner.embedders`` for
the text encoders (OpenCLIP with fused q/k/v ``in_proj``). A loaded round trip that reproduces the
original components' outputs proves both directions.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from tiny import tiny_components

UNET = "model.diffusion_model."
VAE = "first_stage_model."
TE_LAYOUT = {  # kind -> [(layout, LDM prefix)] per text encoder, in kohya order
    "sd1": [("clip", "cond_stage_model.transformer.")],
    "sd2": [("open_clip", "cond_stage_model.model.")],
    "sdxl": [("clip", "conditioner.embedders.0.transformer."), ("open_clip", "conditioner.embedders.1.model.")],
}
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _unet_name(key: str, per_block: int, up_has_attn: list[bool]) -> str:
    for old, new in _TOP.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        side, block, part, layer, rest = m.groups()
        index = (1 if side == "down" else 0) + int(block) * (per_block + 1) + int(layer)
        name = "input_blocks" if side == "down" else "output_blocks"
        if part == "resnets":
            return f"{name}.{index}.0.{_resnet_rest(rest)}"
        return f"{name}.{index}.1.{rest}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key)
    if m:
        return f"input_blocks.{1 + int(m[1]) * (per_block + 1) + per_block}.0.op.{m[2]}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key)
    if m:
        block = int(m[1])
        slot = 2 if up_has_attn[block] else 1
        return f"output_blocks.{block * (per_block + 1) + per_block}.{slot}.conv.{m[2]}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        part, layer, rest = m.groups()
        if part == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * int(layer)}.{_resnet_rest(rest)}"
    raise KeyError(f"no LDM name for UNet key {key}")


def _resnet_rest(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET.get(head, head)}.{tail}"


def unet_to_ldm(unet) -> dict:
    """``model.diffusion_model.*`` tensors of a diffusers UNet2DConditionModel."""
    per_block = unet.config.layers_per_block
    up_has_attn = ["CrossAttn" in t for t in unet.config.up_block_types]
    return {UNET + _unet_name(k, per_block, up_has_attn): v for k, v in unet.state_dict().items()}


def _vae_name(key: str, levels: int) -> str:
    key = key.replace("conv_norm_out", "norm_out")
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.",
                 lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                 lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", key)
    key = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", key)
    key = key.replace(".mid_block.attentions.0.", ".mid.attn_1.")
    key = key.replace("conv_shortcut", "nin_shortcut")
    for old, new in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
        key = key.replace(f"attn_1.{old}.", f"attn_1.{new}.")
    return key


def vae_to_ldm(vae, prefix: str = VAE) -> dict:
    """LDM VAE tensors (attention projections as 1x1 convs, as the original files store them)."""
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        name = _vae_name(key, levels)
        if ".attn_1." in name and name.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[prefix + name] = value
    return out


def _bare(model) -> dict:
    return {(k[len("text_model."):] if k.startswith("text_model.") else k): v for k, v in model.state_dict().items()}


def clip_to_ldm(te, prefix: str) -> dict:
    """CLIP-L in transformers' layout under ``prefix`` (with the position ids real files carry)."""
    out = {prefix + "text_model." + k: v for k, v in _bare(te).items()}
    out[prefix + "text_model.embeddings.position_ids"] = torch.arange(te.config.max_position_embeddings)[None]
    return out


def open_clip_to_ldm(te, prefix: str) -> dict:
    """OpenCLIP layout: resblocks with fused in_proj, ln_1/ln_2, c_fc/c_proj, text_projection."""
    sd = _bare(te)
    hidden = te.config.hidden_size
    out = {prefix + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
           prefix + "positional_embedding": sd["embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": sd["final_layer_norm.weight"],
           prefix + "ln_final.bias": sd["final_layer_norm.bias"],
           prefix + "logit_scale": torch.tensor(4.6)}
    # SD2's encoder has no projection but its files store one; its first dimension is the width.
    projection = sd["text_projection.weight"].T if "text_projection.weight" in sd else torch.randn(hidden, hidden)
    out[prefix + "text_projection"] = projection.contiguous()
    for i in range(te.config.num_hidden_layers):
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [sd[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv"], dim=0)
            for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[dst + f"{b}.{kind}"] = sd[src + f"{a}.{kind}"]
    return out


def ldm_state_dict(kind: str, parts: dict, with_vae: bool = True) -> dict:
    """The single-file (LDM) state dict of ``tiny_components(kind)``-shaped parts."""
    sd = unet_to_ldm(parts["unet"])
    if with_vae:
        sd.update(vae_to_ldm(parts["vae"]))
    for te, (layout, prefix) in zip(parts["text_encoders"], TE_LAYOUT[kind]):
        sd.update(clip_to_ldm(te, prefix) if layout == "clip" else open_clip_to_ldm(te, prefix))
    return sd


def save_state_dict(sd: dict, path: Path, fmt: str = "safetensors") -> Path:
    """Write ``sd`` as safetensors or as a ``{"state_dict": ...}`` torch checkpoint."""
    path = Path(path)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "ckpt":
        torch.save({"state_dict": sd, "global_step": 1}, path)
    else:
        raise ValueError(f"fmt must be 'safetensors' or 'ckpt', not {fmt!r}")
    return path


def write_single_file(kind: str, path: Path, fmt: str = "safetensors", seed: int = 0, extra: dict | None = None,
                      with_vae: bool = True) -> dict:
    """Write a tiny ``kind`` model as an LDM single file; returns its original components."""
    parts = tiny_components(kind, seed)
    sd = ldm_state_dict(kind, parts, with_vae=with_vae)
    sd.update(extra or {})
    save_state_dict(sd, path, fmt)
    return parts


def write_config_dir(kind: str, folder: Path, parts: dict | None = None) -> Path:
    """A diffusers-format config folder (configs only) for the tiny ``kind`` model."""
    folder = Path(folder)
    parts = parts or tiny_components(kind)
    parts["unet"].save_config(folder / "unet")
    parts["vae"].save_config(folder / "vae")
    parts["noise_scheduler"].save_config(folder / "scheduler")
    names = ["text_encoder", "text_encoder_2"]
    for name, te, tok in zip(names, parts["text_encoders"], parts["tokenizers"]):
        config = te.config.to_dict()
        config["architectures"] = [type(te).__name__]
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(config, indent=2))
        tok_dir = folder / name.replace("text_encoder", "tokenizer")
        tok_dir.mkdir(parents=True, exist_ok=True)
        (tok_dir / "tokenizer_config.json").write_text(json.dumps(
            {"model_max_length": 77, "pad_token": str(tok.pad_token)}))
    return folder


def keys_file(path: Path, shapes: dict) -> Path:
    """A safetensors file holding zero tensors of the given key -> shape (for detection tests)."""
    from safetensors.torch import save_file

    save_file({k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}, str(path))
    return Path(path)


def block_network(monkeypatch) -> None:
    """Make every connection attempt fail the test (loading must never reach a hub)."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
