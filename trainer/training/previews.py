"""Images rendered with the model being trained: previews during a run and the iLECO prompt preview.

``render`` draws prompts with the trainer's own small sampler on a bundle: the prompts encoded as
training encodes them (``conditioning.PromptEncoder``: the web-UIs' chunking and layers), Euler
sampling with classifier-free guidance (diffusers' ``EulerDiscreteScheduler`` built from the
bundle's noise schedule, so v-prediction and zero-terminal-SNR models sample right), the latents
decoded with the family's latent scale. Flux and Z-Image sample with Euler steps on the velocity
(``losses.flow_euler``, the sampler iLECO's trajectory uses) down their shifted schedule. It is written here rather than taken from a diffusers
pipeline because the pipelines assume the VAE's configured scaling factor and their own prompt
encoding, while a preview must show the model exactly as training sees it.

``Previewer`` renders the preview prompts every ``preview_every_steps`` steps with the network on
and with it off (the same seed, side by side), and writes one image per step,
``logs/<YYYYMMDD>/<name>/previews/step_<k>.png``: one row per prompt, network on left, off right.

A preview never changes the run: sampling runs under ``torch.no_grad`` with its own random
generator, and the global random state (which the data order and noise draws use) is put back.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from trainer.atomic import atomic_path
from trainer.conditioning import PromptEncoder

GUIDANCE = 7.0


def split_prompts(text: str) -> list[str]:
    """One prompt per non-empty line."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def default_prompts(config, captions=()) -> list[str]:
    """The preview prompts of a run: ``preview_prompts`` when set; else iLECO's original and target
    prompts, or the trigger word and the first two captions."""
    from trainer.modes import get_mode

    given = split_prompts(config.preview_prompts)
    if given:
        return given
    if get_mode(config.mode).takes_prompts:
        found = [p for p in (config.original_prompt, config.target_prompt) if (p or "").strip()]
        return found or [""]
    found = [c for c in list(captions)[:2] if c]
    trigger = config.lora_trigger_word.strip()
    if trigger and trigger not in found:
        found.insert(0, trigger)
    return found or [""]


def preview_folder(logs_dir: Path, name: str) -> Path:
    """``logs/<YYYYMMDD>/<name>/previews``."""
    return Path(logs_dir) / time.strftime("%Y%m%d") / name / "previews"


@contextlib.contextmanager
def kept_random_state(device: torch.device | None = None):
    """Put the global random generators (python, numpy, torch, CUDA) back as they were."""
    py, npy = random.getstate(), np.random.get_state()
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def render(bundle, prompts: list[str], *, seed: int, size: tuple[int, int], steps: int, negative: str = "",
           guidance: float = GUIDANCE, autocast_dtype: torch.dtype | None = None) -> list[Image.Image]:
    """One image per prompt, all from the same starting noise (``seed``); ``size`` = (height, width)."""
    from diffusers import EulerDiscreteScheduler

    from trainer.modes.base import unet_forward

    if bundle.family.flow:
        return _render_flow(bundle, prompts, seed=seed, size=size, steps=steps, autocast_dtype=autocast_dtype)
    device = bundle.device
    factor = bundle.vae_scale_factor
    height, width = (int(size[0]) // factor) * factor, (int(size[1]) // factor) * factor
    if height <= 0 or width <= 0:
        raise ValueError(f"preview size {size} is too small; use at least {factor} pixels a side")
    scheduler = EulerDiscreteScheduler.from_config(bundle.noise_scheduler.config)
    encoder = PromptEncoder(bundle)
    images = []
    unet_dtype = next(bundle.unet.parameters()).dtype
    vae_dtype = next(iter([*bundle.vae.parameters(), *bundle.vae.buffers()])).dtype
    channels = bundle.unet.config.in_channels
    for prompt in prompts:
        with _autocast(device, autocast_dtype):
            cond = encoder.encode([prompt, negative or ""])
        scheduler.set_timesteps(int(steps), device=device)  # also starts its step count again
        generator = torch.Generator("cpu").manual_seed(int(seed))
        latents = torch.randn((1, channels, height // factor, width // factor), generator=generator)
        latents = (latents * scheduler.init_noise_sigma).to(device=device, dtype=torch.float32)
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            with _autocast(device, autocast_dtype):
                out = unet_forward(bundle, model_in.to(unet_dtype), t.expand(2).to(device), cond.to(device)).float()
            pos, neg = out.chunk(2)
            latents = scheduler.step(neg + guidance * (pos - neg), t, latents).prev_sample
        pixels = bundle.vae.decode((latents / bundle.family.latent_scale).to(vae_dtype)).sample
        arr = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        images.append(Image.fromarray(arr, "RGB"))
    return images


# Flux.1-dev's guidance scale at inference (FluxPipeline's default); schnell has no guidance input.
FLUX_PREVIEW_GUIDANCE = 3.5


def _render_flow(bundle, prompts: list[str], *, seed: int, size: tuple[int, int], steps: int,
                 autocast_dtype: torch.dtype | None) -> list[Image.Image]:
    """Flux / Z-Image: Euler on the velocity (``losses.flow_euler``, iLECO's sampler) from σ = 1 down the
    family's shifted schedule, as their pipelines sample: no negative prompt and no classifier-free
    guidance (Flux-dev takes its guidance as an input, schnell and Z-Image-Turbo sample without)."""
    from trainer.modes.base import transformer_forward
    from trainer.training.losses import flow_euler, shift_sigmas

    device = bundle.device
    factor = bundle.vae_scale_factor * (2 if bundle.family.name == "flux" else 1)  # Flux packs 2x2 latents
    height, width = (int(size[0]) // factor) * factor, (int(size[1]) // factor) * factor
    if height <= 0 or width <= 0:
        raise ValueError(f"preview size {size} is too small; use at least {factor} pixels a side")
    latent_hw = (height // bundle.vae_scale_factor, width // bundle.vae_scale_factor)
    sched = bundle.noise_scheduler
    plain = torch.linspace(1.0, 1.0 / int(steps), int(steps))
    sigmas = shift_sigmas(plain, sched, latent_hw).tolist() + [0.0]
    total = float(sched.config.num_train_timesteps)
    encoder = PromptEncoder(bundle)
    unet_dtype = next(bundle.unet.parameters()).dtype
    vae_dtype = next(iter([*bundle.vae.parameters(), *bundle.vae.buffers()])).dtype
    fam = bundle.family
    images = []
    for prompt in prompts:
        with _autocast(device, autocast_dtype):
            cond = encoder.encode([prompt]).to(device)
        generator = torch.Generator("cpu").manual_seed(int(seed))
        latents = torch.randn((1, bundle.latent_channels, *latent_hw), generator=generator).to(device)

        def velocity(x, i):
            t = torch.full((1,), sigmas[i] * total, device=device)
            with _autocast(device, autocast_dtype):
                return transformer_forward(bundle, x.to(unet_dtype), t, cond, guidance=FLUX_PREVIEW_GUIDANCE).float()

        latents = flow_euler(latents, sigmas, velocity)
        pixels = bundle.vae.decode((latents / fam.latent_scale + fam.latent_shift).to(vae_dtype)).sample
        arr = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        images.append(Image.fromarray(arr, "RGB"))
    return images


def grid(rows: list[list[Image.Image]]) -> Image.Image:
    """Images in rows (all of one size), 4 pixels apart on white."""
    width, height = rows[0][0].size
    gap = 4
    cols = max(len(r) for r in rows)
    sheet = Image.new("RGB", (cols * width + (cols - 1) * gap, len(rows) * height + (len(rows) - 1) * gap), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            sheet.paste(image, (x * (width + gap), y * (height + gap)))
    return sheet


def save_image(image: Image.Image, path: Path) -> Path:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


@dataclass
class Previewer:
    """Renders the preview prompts with ``network`` on and off at every ``every``-th step."""

    bundle: object
    network: object
    prompts: list
    folder: Path
    every: int
    seed: int = 1
    size: tuple = (512, 512)
    steps: int = 20
    negative: str = ""
    autocast_dtype: torch.dtype | None = None
    on_parts: Callable[[bool], None] | None = None  # (True) before a render, (False) after: bring parts back / away
    prefix: str = ""                                # file-name prefix (a pass other than "main")

    def due(self, step: int) -> bool:
        return self.every > 0 and step > 0 and step % self.every == 0

    def render_step(self, step: int) -> Path:
        """Render now and write ``step_<step>.png``; the network and random state are left as they were."""
        if self.on_parts is not None:
            self.on_parts(True)
        try:
            with kept_random_state(self.bundle.device):
                kwargs = dict(seed=self.seed, size=self.size, steps=self.steps, negative=self.negative,
                              autocast_dtype=self.autocast_dtype)
                on = render(self.bundle, self.prompts, **kwargs)
                with self.network.multiplier_as(0.0):
                    off = render(self.bundle, self.prompts, **kwargs)
        finally:
            if self.on_parts is not None:
                self.on_parts(False)
        return save_image(grid([[a, b] for a, b in zip(on, off)]), self.folder / f"{self.prefix}step_{step}.png")
