"""Shared test helpers: a host that hands out tiny models, tiny image folders, quick configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tiny import tiny_bundle


class TinyHost:
    """A Host that returns a fresh tiny bundle of ``kind`` (same seed -> same weights)."""

    def __init__(self, kind: str = "sd1", out: Path | None = None, seed: int = 0):
        self.kind, self.out, self.seed = kind, Path(out or "."), seed
        self.loads = 0
        self.restored = 0
        self.bundle = None

    def load(self, config):
        self.loads += 1
        if self.kind in ("flux", "zimage"):
            from tiny_dit import tiny_dit_bundle

            self.bundle = tiny_dit_bundle(self.kind, self.seed)
        else:
            self.bundle = tiny_bundle(self.kind, self.seed)
        return self.bundle

    def restore(self) -> None:
        self.restored += 1

    def lora_dir(self) -> Path:
        return self.out


def pattern_image(path: Path, seed: int, size=(64, 64), mode="RGB") -> Path:
    """A smooth random colour pattern (learnable, unlike white noise)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    chans = []
    for _ in range(3):
        a, b, c = rng.uniform(-3, 3, 3)
        chans.append(0.5 + 0.5 * np.sin(a * xx * 6 + b * yy * 6 + c))
    arr = (np.stack(chans, -1) * 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode == "RGBA":
        img = img.convert("RGBA")
    img.save(path)
    return path


def image_folder(root: Path, n: int = 4, size=(64, 64), captions=True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pattern_image(root / f"img{i}.png", i, size)
        if captions:
            (root / f"img{i}.txt").write_text(f"pattern number {i}, colourful", encoding="utf-8")
    return root


def quick_config(**values):
    """A TrainConfig for a fast CPU run on a tiny model (fp32 everywhere, few steps); every other
    setting, min-SNR weighting (train_snr_gamma 5) included, is the product default."""
    from trainer.config import TrainConfig

    base = {
        "image_size(height, width)": "64", "image_min_length": "64", "image_buckets_step": "64",
        "train_iterations": "12", "train_batch_size": "2", "train_learning_rate": "1e-3",
        "train_optimizer": "AdamW", "train_lr_scheduler": "constant", "network_rank": "4",
        "network_alpha": "4", "train_model_precision": "fp32", "train_lora_precision": "fp32",
        "save_precision": "fp32", "train_VAE_precision": "fp32", "train_seed": "1",
        "save_lora_name": "tiny",
    }
    base.update({k: v for k, v in values.items()})
    return TrainConfig.from_dict(base)
