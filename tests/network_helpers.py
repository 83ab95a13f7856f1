"""Helpers of the network tests: full-size U-Net configs, fixed U-Net / text-encoder inputs and
non-zero module weights."""

from __future__ import annotations

import torch

from trainer.network.layers import LoHaModule

# Real configs (the fields that shape the module tree), so the full-size U-Nets can be built on the
# meta device in a fraction of a second.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
)
SD21_UNET = dict(SD15_UNET, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                 use_linear_projection=True, upcast_attention=True, sample_size=96)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)


def meta_unet(config: dict):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


TOKENS = torch.tensor([[49406, 320, 1125, 539, 518, 2368, 49407, 49407]])


def unet_inputs(bundle, seed: int = 0) -> tuple:
    """(sample, timesteps, hidden states, extra kwargs) for a tiny U-Net of ``bundle``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 600])
    c = torch.randn(2, 7, bundle.unet.config.cross_attention_dim, generator=g)
    kw = {}
    if bundle.family.name == "sdxl":
        text_embeds = torch.randn(2, bundle.text_encoders[1].config.projection_dim, generator=g)
        kw["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": torch.zeros(2, 6)}
    return x, t, c, kw


def unet_out(unet, inputs) -> torch.Tensor:
    x, t, c, kw = inputs
    with torch.no_grad():
        return unet(x, t, c, **kw).sample


def te_out(encoder) -> torch.Tensor:
    with torch.no_grad():
        return encoder(TOKENS).last_hidden_state


def randomize(net, seed: int = 1, std: float = 0.05) -> None:
    """Give every module a non-zero effect (new modules start as no-ops)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.all_modules:
            weight = module.hada_w1_a if isinstance(module, LoHaModule) else module.lora_up.weight
            weight.copy_(torch.randn(weight.shape, generator=g) * std)
