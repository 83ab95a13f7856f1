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
