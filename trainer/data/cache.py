"""Latent and text-embedding caches: each image (and mirrored copy) is VAE-encoded once.

Latents are kept in memory (CPU) by default; with ``disk_dir`` they are also written to and
read back from ``.pt`` files keyed by the image, its crop and flip, and the VAE, so a second
run on the same data skips the VAE entirely. Text embeddings are cached per prompt while
the text encoder is frozen.

A latent is encoded either up front (``build``) or the first time a batch needs it
(``ensure``, what LoRA mode does unless its memory profile wants the VAE gone before the U-Net
arrives). Encoding on first use was chosen over a background encoder thread: the first step
then waits for one batch's latents instead of all of them, while the batch order stays exactly
the seeded one (a background filler whose first epoch "uses what is ready" would make the
order, and so the trained weights, depend on timing); no second thread competes with the step
for a CPU's cores or for the GPU's stream, and autocast, which is per thread, needs no care
beyond switching it off around the encode. The total VAE work is the same, spread over the
first epoch, and a run shorter than one epoch encodes only what it uses.

Every latent is a pure function of its sample: the posterior sample's noise comes from a
generator seeded by the image path, crop and flip (``sample_seed``), never from the global
random state. So it does not matter whether a latent was encoded up front, on first use in
whatever order, or read from the disk cache: the same seed trains the same weights.
"""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from trainer.atomic import atomic_path
from trainer.conditioning import Conditioning


def encode_latents(vae, pixels: torch.Tensor, scale: float, shift: float = 0.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """VAE-encode pixels in [-1, 1] to scaled latents (one random sample of the posterior,
    drawn with ``generator`` when given, on the CPU, so the draw is the same on every device)."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return (dist.sample(generator=generator) - shift) * scale


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


def sample_seed(spec) -> int:
    """The seed of a sample's posterior draw: from its image path, bucket, crop and flip only, so
    a latent is the same whenever, in whatever order and in whichever run it is encoded."""
    text = f"{Path(spec.item.path).resolve()}|{spec.bucket}|{spec.crop_box}|{spec.flip}"
    return int(hashlib.sha1(text.encode()).hexdigest()[:15], 16)


def _spec_key(spec, vae_id: str) -> str:
    src = Path(spec.item.path)
    stat = src.stat()
    text = f"{src.resolve()}|{stat.st_mtime_ns}|{stat.st_size}|{spec.bucket}|{spec.crop_box}|{spec.flip}|{vae_id}"
    return hashlib.sha1(text.encode()).hexdigest()


class LatentCache:
    """Latents (and latent-resolution masks) of every planned sample, each computed once.

    ``specs`` are the planned samples; ``latents[i]`` / ``masks[i]`` hold sample ``i`` once it is
    encoded (None before). ``build`` encodes every sample now; ``ensure(indices)`` encodes the
    ones a batch needs that are still missing. ``progress(done, total)`` is told after each
    encoded or read-back sample.
    """

    def __init__(self, vae, specs: list | None = None, *, scale: float, shift: float = 0.0,
                 disk_dir: Path | None = None, vae_id: str = "vae", warn: Callable[[str], None] | None = None,
                 progress: Callable[[int, int], None] | None = None):
        self.vae, self.scale, self.shift = vae, scale, shift
        self.warn = warn or (lambda message: None)
        self.progress = progress
        self.disk_dir = Path(disk_dir) if disk_dir else None
        self.vae_id = vae_id
        self.specs: list = []
        self.latents: list[torch.Tensor | None] = []
        self.masks: list[torch.Tensor | None] = []
        self.vae_calls = 0
        self.done = 0
        if specs is not None:
            self.plan(specs)

    def plan(self, specs: list) -> "LatentCache":
        """Set the samples to cache (nothing is encoded yet)."""
        self.specs = list(specs)
        self.latents = [None] * len(self.specs)
        self.masks = [None] * len(self.specs)
        self.done = 0
        return self

    @property
    def complete(self) -> bool:
        """Whether every planned sample has its latent."""
        return self.done == len(self.specs)

    def build(self, specs: list | None = None, progress: Callable[[int, int], None] | None = None) -> "LatentCache":
        """Encode (or read back) every planned sample now."""
        if specs is not None:
            self.plan(specs)
        if progress is not None:
            self.progress = progress
        return self.ensure(range(len(self.specs)))

    @torch.no_grad()
    def ensure(self, indices) -> "LatentCache":
        """Encode (or read back) the samples of ``indices`` that have no latent yet, in that order.

        Autocast is off while the VAE runs (a step's autocast must not change a latent)."""
        missing = [i for i in dict.fromkeys(int(i) for i in indices) if self.latents[i] is None]
        if not missing:
            return self
        device_type = self.vae.device.type
        off = torch.autocast(device_type=device_type, enabled=False) if device_type in ("cuda", "cpu") else nullcontext()
        with off:
            for i in missing:
                self.latents[i], self.masks[i] = self._load_or_encode(self.specs[i])
                self.done += 1
                if self.progress:
                    self.progress(self.done, len(self.specs))
        return self

    def get(self, indices) -> list[torch.Tensor]:
        """The latents of ``indices`` (encoded first where missing)."""
        self.ensure(indices)
        return [self.latents[int(i)] for i in indices]

    def _load_or_encode(self, spec):
        path = None
        if self.disk_dir is not None:
            path = self.disk_dir / f"{_spec_key(spec, self.vae_id)}.pt"
            if path.is_file():
                loaded = self._read(path)
                if loaded is not None:
                    return loaded
        pixels, mask = spec.load()
        x = torch.from_numpy(np.ascontiguousarray(pixels))[None]
        generator = torch.Generator().manual_seed(sample_seed(spec))
        latent = encode_latents(self.vae, x, self.scale, self.shift, generator)[0].float().cpu()
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
