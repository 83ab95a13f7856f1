"""Latent and text-embedding caches: each image (and mirrored copy) is VAE-encoded once.

Latents are kept in memory (CPU) by default; with ``disk_dir`` they are also written to and
read back from ``.pt`` files keyed by the image, its crop and flip, and the VAE, so a second
run on the same data skips the VAE entirely. Text embeddings are cached per prompt while
the text encoder is frozen.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from trainer.atomic import atomic_path
from trainer.conditioning import Conditioning


def encode_latents(vae, pixels: torch.Tensor, scale: float, shift: float = 0.0) -> torch.Tensor:
    """VAE-encode pixels in [-1, 1] to scaled latents (one random sample of the posterior)."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return (dist.sample() - shift) * scale


def encode_latents_mean(vae, pixels: torch.Tensor, scale: float, shift: float = 0.0) -> torch.Tensor:
    """VAE-encode to the posterior mean: deterministic, so the latents of two images of a pair
    differ only where the images differ (a random posterior sample each would add a spurious
    difference that ADDifT and Difference would then learn)."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return (dist.mean - shift) * scale


def mask_to_latent(mask: np.ndarray | None, latent_hw: tuple[int, int]) -> torch.Tensor | None:
    """Nearest-downsample a pixel mask (H, W) to (1, h, w) at latent resolution."""
    if mask is None:
        return None
    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return F.interpolate(t, size=latent_hw, mode="nearest")[0]


def _spec_key(spec, vae_id: str) -> str:
    src = Path(spec.item.path)
    stat = src.stat()
    text = f"{src.resolve()}|{stat.st_mtime_ns}|{stat.st_size}|{spec.bucket}|{spec.crop_box}|{spec.flip}|{vae_id}"
    return hashlib.sha1(text.encode()).hexdigest()


class LatentCache:
    """Latents (and latent-resolution masks) of every planned sample, computed once."""

    def __init__(self, vae, *, scale: float, shift: float = 0.0, disk_dir: Path | None = None,
                 vae_id: str = "vae", warn: Callable[[str], None] | None = None):
        self.vae, self.scale, self.shift = vae, scale, shift
        self.warn = warn or (lambda message: None)
        self.disk_dir = Path(disk_dir) if disk_dir else None
        self.vae_id = vae_id
        self.latents: list[torch.Tensor] = []
        self.masks: list[torch.Tensor | None] = []
        self.vae_calls = 0

    @torch.no_grad()
    def build(self, specs: list, progress: Callable[[int, int], None] | None = None) -> "LatentCache":
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        # The VAE's posterior samples use a forked RNG, so a run that reads its latents back
        # from disk draws the same noise and timesteps afterwards as the run that encoded them.
        devices = [self.vae.device] if self.vae.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for i, spec in enumerate(specs):
                latent, mask = self._load_or_encode(spec, factor)
                self.latents.append(latent)
                self.masks.append(mask)
                if progress:
                    progress(i + 1, len(specs))
        return self

    def _load_or_encode(self, spec, factor: int):
        path = None
        if self.disk_dir is not None:
            path = self.disk_dir / f"{_spec_key(spec, self.vae_id)}.pt"
            if path.is_file():
                loaded = self._read(path)
                if loaded is not None:
                    return loaded
        pixels, mask = spec.load()
        x = torch.from_numpy(np.ascontiguousarray(pixels))[None]
        latent = encode_latents(self.vae, x, self.scale, self.shift)[0].float().cpu()
        self.vae_calls += 1
        lmask = mask_to_latent(mask, tuple(latent.shape[-2:]))
        if path is not None:
            with atomic_path(path) as tmp:  # a killed run leaves no torn cache file
                torch.save({"latent": latent, "mask": lmask}, tmp)
        return latent, lmask

    def _read(self, path: Path):
        """(latent, mask) of a disk cache entry, or None (with a warning naming it) when unusable."""
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            latent, mask = data["latent"], data.get("mask")
            if not isinstance(latent, torch.Tensor) or latent.dim() != 3 or not (
                    mask is None or isinstance(mask, torch.Tensor)):
                raise ValueError("not a cached latent")
        except Exception as error:  # torn (RuntimeError), empty (EOFError), foreign (KeyError...)
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            self.warn(f"latent cache file {path} could not be read ({reason}); encoding the image again")
            return None
        return latent, mask


class TextCache:
    """Conditioning per distinct prompt, encoded once with the frozen text encoder(s)."""

    def __init__(self, encoder):
        self.encoder = encoder
        self._store: dict[str, Conditioning] = {}

    @torch.no_grad()
    def build(self, prompts: list[str], batch: int = 16) -> "TextCache":
        todo = sorted({p for p in [*prompts, ""] if p not in self._store})
        for i in range(0, len(todo), batch):
            chunk = todo[i:i + batch]
            cond = self.encoder.encode(chunk)
            for j, p in enumerate(chunk):
                self._store[p] = cond.index(slice(j, j + 1)).to("cpu")
        return self

    def get(self, prompts: list[str]) -> Conditioning:
        return Conditioning.cat([self._store[p] for p in prompts], pad=self._store[""])
