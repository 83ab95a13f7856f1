"""Tiny random Flux.1 and Z-Image models for tests, built from the configs the package ships with
only the widths and depths made small (module names, classes and call paths are the real ones).

Tokenizers: the T5 and Qwen3 tokenizers are not shipped (they come with the user's text-encoder
files), so the tests tokenize with the shipped CLIP BPE; a Qwen-style chat template is set on the
Z-Image one so the pipeline's prompt wrapping runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tiny import VOCAB, tiny_tokenizer

ASSETS = Path(__file__).resolve().parent.parent / "trainer" / "assets"
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT_LEN = 16


def _config(family: str, part: str, name: str = "config.json") -> dict:
    return json.loads((ASSETS / family / part / name).read_text())


def tiny_dit_vae():
    from diffusers import AutoencoderKL

    cfg = _config("flux", "vae")
    cfg.update(block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=8, sample_size=64)
    vae = AutoencoderKL.from_config(cfg)
    with torch.no_grad():  # a narrow posterior, as a trained VAE has (see tests/tiny.py)
        vae.encoder.conv_out.bias[16:] = -8.0
    return vae


def tiny_flux_transformer(double: int = 2, single: int = 1):
    from diffusers import FluxTransformer2DModel

    cfg = _config("flux", "transformer")
    cfg.update(attention_head_dim=16, axes_dims_rope=[4, 6, 6], num_attention_heads=2, joint_attention_dim=32,
               pooled_projection_dim=32, num_layers=double, num_single_layers=single)
    return FluxTransformer2DModel.from_config(cfg)


def tiny_zimage_transformer(layers: int = 2):
    from diffusers import ZImageTransformer2DModel

    cfg = _config("zimage", "transformer")
    cfg.update(dim=32, n_heads=2, n_kv_heads=2, n_layers=layers, n_refiner_layers=1, cap_feat_dim=32,
               axes_dims=[8, 4, 4], axes_lens=[256, 64, 64])
    return ZImageTransformer2DModel.from_config(cfg)


def tiny_flux_text_encoders():
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_cfg = _config("flux", "text_encoder")
    clip_cfg.update(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                    projection_dim=32, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    clip = CLIPTextModel(CLIPTextConfig(**clip_cfg))
    t5_cfg = _config("flux", "text_encoder_2")
    t5_cfg.update(d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2, vocab_size=VOCAB)
    t5 = T5EncoderModel(T5Config(**t5_cfg))
    t5_tok = tiny_tokenizer()
    t5_tok.model_max_length = TEXT_LEN
    return [clip, t5], [tiny_tokenizer(), t5_tok]


def tiny_qwen3():
    from transformers import Qwen3Config, Qwen3Model

    cfg = _config("zimage", "text_encoder")
    cfg.update(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, max_position_embeddings=256,
               bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 128
    return Qwen3Model(Qwen3Config(**cfg)), tok


def tiny_dit_components(family: str, seed: int = 0) -> dict:
    from trainer.hosts.dit_parts import flow_scheduler

    torch.manual_seed(seed)
    if family == "flux":
        transformer = tiny_flux_transformer()
        encoders, tokenizers = tiny_flux_text_encoders()
    else:
        transformer = tiny_zimage_transformer()
        qwen, tok = tiny_qwen3()
        encoders, tokenizers = [qwen], [tok]
    return dict(unet=transformer, vae=tiny_dit_vae(), text_encoders=encoders, tokenizers=tokenizers,
                noise_scheduler=flow_scheduler(_config(family, "scheduler", "scheduler_config.json")))


def tiny_dit_bundle(family: str, seed: int = 0):
    from trainer.bundle import ModelBundle
    from trainer.families import get_family

    parts = tiny_dit_components(family, seed)
    return ModelBundle(family=get_family(family), prediction_type="flow", source=f"tiny-{family}", **parts).freeze()


def _swap_halves(t):
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def flux_to_bfl(transformer) -> dict:
    """A diffusers FluxTransformer2DModel's tensors in the original BFL layout (``double_blocks.*``,
    fused ``qkv`` / ``linear1``): the inverse of diffusers' single-file converter, for writing the
    files and host models that Forge and the BFL downloads hold."""
    sd = transformer.state_dict()
    out = {}

    def pair(src, dst):
        for kind in ("weight", "bias"):
            if f"{src}.{kind}" in sd:
                out[f"{dst}.{kind}"] = sd[f"{src}.{kind}"]

    def fused(srcs, dst):
        for kind in ("weight", "bias"):
            out[f"{dst}.{kind}"] = torch.cat([sd[f"{s}.{kind}"] for s in srcs], dim=0)

    pair("x_embedder", "img_in")
    pair("context_embedder", "txt_in")
    for src, dst in (("timestep_embedder", "time_in"), ("text_embedder", "vector_in"),
                     ("guidance_embedder", "guidance_in")):
        pair(f"time_text_embed.{src}.linear_1", f"{dst}.in_layer")
        pair(f"time_text_embed.{src}.linear_2", f"{dst}.out_layer")
    doubles = {int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")}
    for i in sorted(doubles):
        s, d = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        pair(s + "norm1.linear", d + "img_mod.lin")
        pair(s + "norm1_context.linear", d + "txt_mod.lin")
        fused([s + "attn.to_q", s + "attn.to_k", s + "attn.to_v"], d + "img_attn.qkv")
        fused([s + "attn.add_q_proj", s + "attn.add_k_proj", s + "attn.add_v_proj"], d + "txt_attn.qkv")
        for src, dst in (("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                         ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")):
            out[f"{d}{dst}.scale"] = sd[f"{s}attn.{src}.weight"]
        pair(s + "attn.to_out.0", d + "img_attn.proj")
        pair(s + "attn.to_add_out", d + "txt_attn.proj")
        pair(s + "ff.net.0.proj", d + "img_mlp.0")
        pair(s + "ff.net.2", d + "img_mlp.2")
        pair(s + "ff_context.net.0.proj", d + "txt_mlp.0")
        pair(s + "ff_context.net.2", d + "txt_mlp.2")
    singles = {int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks.")}
    for i in sorted(singles):
        s, d = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        pair(s + "norm.linear", d + "modulation.lin")
        fused([s + "attn.to_q", s + "attn.to_k", s + "attn.to_v", s + "proj_mlp"], d + "linear1")
        pair(s + "proj_out", d + "linear2")
        out[d + "norm.query_norm.scale"] = sd[s + "attn.norm_q.weight"]
        out[d + "norm.key_norm.scale"] = sd[s + "attn.norm_k.weight"]
    out["final_layer.linear.weight"] = sd["proj_out.weight"]
    out["final_layer.linear.bias"] = sd["proj_out.bias"]
    out["final_layer.adaLN_modulation.1.weight"] = _swap_halves(sd["norm_out.linear.weight"])
    out["final_layer.adaLN_modulation.1.bias"] = _swap_halves(sd["norm_out.linear.bias"])
    return out


def t5_state(t5) -> dict:
    """A transformers T5EncoderModel's tensors with the tied token embedding once, as T5 files store them."""
    return {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
