"""Tiny random SD1 / SD2 / SDXL-shaped models for tests (no download, CPU, seconds).

The shapes follow the real families closely enough that module names, block ids and
conditioning paths are the real ones: SD1 uses conv proj_in and CLIP-L-like text
encoder, SD2 linear projections and v-prediction, SDXL two text encoders, pooled output and
``text_time`` added conditioning. The VAE has four levels, so latents are 1/8 of pixels as
in every SD family.
"""

from __future__ import annotations

from pathlib import Path

import dataclasses

import torch

TINY_LATENT_SCALE = 5.0
TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "trainer" / "assets" / "clip_tokenizer"
HIDDEN = 32
VOCAB = 49408


def tiny_tokenizer(pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"),
        model_max_length=77, pad_token=pad_token,
    )


def _text_config(**extra):
    from transformers import CLIPTextConfig

    cfg = dict(
        hidden_size=HIDDEN, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=VOCAB, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407,
    )
    cfg.update(extra)
    return CLIPTextConfig(**cfg)


def tiny_vae():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=8, sample_size=64,
    )
    # A trained SD VAE has a narrow posterior (std far below the latent spread); a random one
    # has std ~1, which would bury the image in sampling noise. Narrow it the same way.
    with torch.no_grad():
        vae.quant_conv.bias[4:] = -8.0
    return vae


def tiny_scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", prediction_type=prediction_type, clip_sample=False,
    )


def tiny_unet(kind: str):
    from diffusers import UNet2DConditionModel

    common = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64), norm_num_groups=32,
    )
    if kind == "sd1":
        return UNet2DConditionModel(
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=HIDDEN, attention_head_dim=8, **common,
        )
    if kind == "sd2":
        return UNet2DConditionModel(
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=HIDDEN, attention_head_dim=(2, 4), use_linear_projection=True,
            upcast_attention=True, **common,
        )
    if kind == "sdxl":
        return UNet2DConditionModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=2 * HIDDEN, attention_head_dim=(2, 4), use_linear_projection=True,
            transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + HIDDEN,
            **common,
        )
    raise ValueError(f"unknown tiny family {kind!r}")


def tiny_components(kind: str, seed: int = 0) -> dict:
    """unet, vae, text_encoders, tokenizers and scheduler of a tiny ``kind`` model."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    if kind == "sdxl":
        tes = [
            CLIPTextModel(_text_config(hidden_act="quick_gelu")),
            CLIPTextModelWithProjection(_text_config(hidden_act="gelu", projection_dim=HIDDEN)),
        ]
        toks = [tiny_tokenizer(), tiny_tokenizer(pad_token="!")]
    elif kind == "sd2":
        tes = [CLIPTextModel(_text_config(hidden_act="gelu"))]
        toks = [tiny_tokenizer(pad_token="!")]
    else:
        tes = [CLIPTextModel(_text_config(hidden_act="quick_gelu"))]
        toks = [tiny_tokenizer()]
    pred = "v_prediction" if kind == "sd2" else "epsilon"
    return dict(
        unet=tiny_unet(kind), vae=tiny_vae(), text_encoders=tes, tokenizers=toks,
        noise_scheduler=tiny_scheduler(pred), prediction_type=pred,
    )


def tiny_bundle(kind: str, seed: int = 0):
    """A frozen ModelBundle of a tiny ``kind`` ("sd1", "sd2", "sdxl") model."""
    from trainer.bundle import ModelBundle
    from trainer.families import get_family

    parts = tiny_components(kind, seed)
    # Scaled SD latents have a spread near 1; the random tiny VAE's raw latents spread ~0.2,
    # so give the tiny family a latent scale that brings them to the same range.
    family = dataclasses.replace(get_family(kind), latent_scale=TINY_LATENT_SCALE)
    bundle = ModelBundle(family=family, source=f"tiny-{kind}", **parts)
    return bundle.freeze()


def save_tiny_diffusers(kind: str, folder: Path, seed: int = 0) -> Path:
    """Write a tiny model as a diffusers folder (model_index.json + components)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    p = tiny_components(kind, seed)
    if kind == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=p["vae"], text_encoder=p["text_encoders"][0], text_encoder_2=p["text_encoders"][1],
            tokenizer=p["tokenizers"][0], tokenizer_2=p["tokenizers"][1], unet=p["unet"],
            scheduler=p["noise_scheduler"],
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=p["vae"], text_encoder=p["text_encoders"][0], tokenizer=p["tokenizers"][0],
            unet=p["unet"], scheduler=p["noise_scheduler"], safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )
    pipe.save_pretrained(folder)
    return Path(folder)
