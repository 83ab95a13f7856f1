"""A tiny SD1-shaped model built in memory, for the first run without a model (``python -m trainer demo``).

Nothing is downloaded: the U-Net and the CLIP text encoder are small random diffusers /
transformers modules (the shipped CLIP tokenizer, hidden size 32), and the autoencoder is
:class:`PoolAutoencoder`, a fixed, weightless stand-in for a VAE: it averages 8x8 pixel cells and
mixes RGB into four latent channels, and decoding undoes both. A random VAE would decode anything
into noise; this one keeps flat colours, so the preview images of a demo run show what the
network learned. Module names and block ids are SD1's, so the saved file is an ordinary SD1 LoRA
for this model (it loads in diffusers with no key left over).

``TinyModelHost`` hands out a fresh bundle of that model to ``run_job``, like any host.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "clip_tokenizer"
HIDDEN = 32
FACTOR = 8            # pixels per latent cell, as in every SD family
# RGB -> four latent channels; well conditioned, so decoding (the pseudo-inverse) is exact for RGB.
_MIX = ((0.9, 0.1, 0.1), (0.1, 0.9, 0.1), (0.1, 0.1, 0.9), (0.4, 0.4, 0.4))
LATENT_SCALE = 1.0


class _Posterior:
    def __init__(self, mean):
        self.mean = mean

    def sample(self, generator=None):
        return self.mean

    def mode(self):
        return self.mean


class _Output:
    def __init__(self, **values):
        self.__dict__.update(values)


class PoolAutoencoder(torch.nn.Module):
    """Average-pool by 8 and mix RGB into 4 channels; decode inverts the mix and repeats each cell."""

    def __init__(self):
        super().__init__()
        mix = torch.tensor(_MIX)
        self.register_buffer("mix", mix)
        self.register_buffer("unmix", torch.linalg.pinv(mix))
        # Read by the trainer (scale factor from the number of levels) and the memory estimate.
        self.config = type("Config", (), {"block_out_channels": [8, 8, 8, 8], "latent_channels": 4,
                                          "scaling_factor": LATENT_SCALE, "shift_factor": None})()

    @property
    def device(self):
        return self.mix.device

    @property
    def dtype(self):
        return self.mix.dtype

    def encode(self, pixels):
        pooled = torch.nn.functional.avg_pool2d(pixels.to(self.mix.dtype), FACTOR)
        return _Output(latent_dist=_Posterior(torch.einsum("lc,bchw->blhw", self.mix, pooled)))

    def decode(self, latents):
        rgb = torch.einsum("cl,blhw->bchw", self.unmix, latents.to(self.mix.dtype))
        return _Output(sample=rgb.repeat_interleave(FACTOR, -2).repeat_interleave(FACTOR, -1))


def tiny_model(seed: int = 0):
    """A frozen SD1-shaped ModelBundle: random U-Net and text encoder, the pooling autoencoder."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from trainer.bundle import ModelBundle
    from trainer.families import get_family

    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(
        hidden_size=HIDDEN, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        hidden_act="quick_gelu"))
    tokenizer = CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"),
                              model_max_length=77, pad_token="<|endoftext|>")
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=HIDDEN, attention_head_dim=8)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False)
    family = dataclasses.replace(get_family("sd1"), latent_scale=LATENT_SCALE)
    bundle = ModelBundle(family=family, unet=unet, vae=PoolAutoencoder(), text_encoders=[text],
                         tokenizers=[tokenizer], noise_scheduler=scheduler, source="tiny demo model (random)")
    return bundle.freeze()


class TinyModelHost:
    """A Host that hands out a fresh tiny model (the same seed gives the same weights)."""

    def __init__(self, out: Path, seed: int = 0):
        self.out, self.seed = Path(out), seed
        self.bundle = None

    def load(self, config):
        self.bundle = tiny_model(self.seed)
        return self.bundle

    def restore(self) -> None:
        self.bundle = None

    def lora_dir(self) -> Path:
        return self.out

    def list_models(self) -> list[str]:
        return []

    def list_vaes(self) -> list[str]:
        return []
