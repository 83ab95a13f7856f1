"""Multi-ADDifT image pairs: discovery by file-name suffix, paired plans, difference masks.

SPEC.md §4.5, §5.7. An original ``base + ext`` pairs with its target ``base + suffix + ext``
in the same folder (the extension compared case-insensitively). Both images of a pair are
first resized (Lanczos) to the per-axis minimum of their sizes, then share one bucket, crop,
sub-image choice and flip, so mirrored and sub-scaled copies stay aligned. Each image keeps
its own caption (trigger word included) and its own alpha mask.

``difference_mask`` makes real the pixel-difference mask that the reference computed and
then threw away.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from trainer.data.errors import DataError
from trainer.data.frames import Frame, make_buckets
from trainer.data.images import ImageInfo, ImageItem, list_image_files, make_item
from trainer.data.samples import (
    Placement, check_count, nothing_fits, open_checked, plan_geometry, probe_all, render, warn,
    warn_upscale,
)

log = logging.getLogger(__name__)

# Sum over R, G, B of |orig - target| on the 0..255 scale above which a pixel differs.
DIFF_THRESHOLD = 10


@dataclass(frozen=True)
class PairScan:
    """Pairs found in a folder, and the images that are in no pair."""

    pairs: list[tuple[Path, Path]]
    unmatched: list[Path]


def _check_suffix(suffix: str) -> str:
    if suffix is None or str(suffix).strip() == "":
        raise DataError("diff_target_name is empty: set the suffix that marks target images, "
                        "e.g. _closed_eyes to pair image1.png with image1_closed_eyes.png")
    if any(sep in suffix for sep in ("/", "\\")):
        raise DataError(f"diff_target_name {suffix!r} contains a path separator; it must be a file-name "
                        "suffix such as _closed_eyes")
    return str(suffix)


def _rule(suffix: str) -> str:
    return (f"each original needs a target in the same folder named <original name>{suffix}<same extension>, "
            f"e.g. image1.png + image1{suffix}.png")


def find_pairs(folder: str | os.PathLike, suffix: str) -> PairScan:
    """Pair every original with its ``suffix`` target under ``folder`` (recursive).

    An image that is some original's target is never an original itself. Raises DataError
    for an empty suffix, a bad folder, or a folder with no pair (listing a few unpaired names).
    """
    suffix = _check_suffix(suffix)
    files = list_image_files(folder)
    index = {(p.parent, p.stem, p.suffix.lower()): p for p in files}

    def original_of(p: Path) -> Path | None:
        if not p.stem.endswith(suffix) or len(p.stem) == len(suffix):
            return None
        return index.get((p.parent, p.stem[: -len(suffix)], p.suffix.lower()))

    pairs: list[tuple[Path, Path]] = []
    for path in files:
        if original_of(path) is not None:
            continue  # a target, not an original
        target = index.get((path.parent, path.stem + suffix, path.suffix.lower()))
        if target is not None:
            pairs.append((path, target))
    paired = {p for pair in pairs for p in pair}
    unmatched = [p for p in files if p not in paired]
    if not pairs:
        shown = ", ".join(p.name for p in unmatched[:5]) + (f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else "")
        raise DataError(f"no image pairs found in {folder} for diff_target_name {suffix!r}: {_rule(suffix)}. "
                        f"Images without a partner: {shown}")
    if unmatched:
        log.info("%d images in %s have no partner and are not used: %s", len(unmatched), folder,
                 ", ".join(p.name for p in unmatched[:10]))
    return PairScan(pairs=pairs, unmatched=unmatched)


@dataclass(frozen=True, kw_only=True)
class PairSampleSpec(Placement):
    """Recipe for one training sample of an (original, target) pair.

    ``orig_size``/``target_size`` are the sources' (width, height); ``common_size`` is the
    per-axis minimum both are resized to first; ``original_size`` is ``common_size`` as
    (height, width).
    """

    orig: ImageItem
    target: ImageItem
    orig_size: Frame
    target_size: Frame
    common_size: Frame

    @property
    def source_key(self) -> tuple:
        """Samples with the same key read the same source files."""
        return (self.orig.path, self.target.path)

    def open_sources(self) -> tuple[Image.Image, Image.Image]:
        """Both images, decoded and resized (Lanczos) to ``common_size``."""
        out = []
        for item, (w, h) in ((self.orig, self.orig_size), (self.target, self.target_size)):
            image = open_checked(item.path, w, h)
            if image.size != self.common_size:
                image = image.resize(self.common_size, Image.Resampling.LANCZOS)
            out.append(image)
        return out[0], out[1]

    def render(self, orig: Image.Image, target: Image.Image):
        """``(orig pixels, target pixels, orig mask, target mask)`` from the opened sources."""
        orig_pixels, orig_mask = render(orig, self)
        target_pixels, target_mask = render(target, self)
        return orig_pixels, target_pixels, orig_mask, target_mask

    def load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Read both files; pixels (3, H, W) float32 in [-1, 1], masks (H, W) or None."""
        return self.render(*self.open_sources())


def plan_pair_samples(
    pairs: Sequence[tuple[str | os.PathLike, str | os.PathLike]], size, step: int, min_length: int,
    max_ratio: float, sub_image_num: int = 0, mirroring: bool = False, disable_upscale: bool = False, *,
    trigger_word: str = "", use_filename_as_tag: bool = False,
) -> list[PairSampleSpec]:
    """Recipes for every training sample of the pairs, both images placed identically.

    Bucket arguments as in ``samples.plan_samples``; captions follow the discovery rules
    per image. A pair with an unreadable image is skipped with a warning naming the file.
    """
    main, sub = make_buckets(size, step, min_length, max_ratio)
    n_sub = check_count(sub_image_num)
    if not pairs:
        raise DataError("no image pairs to plan: the pair list is empty")
    if n_sub and not sub:
        warn(f"sub_image_num is {n_sub} but these bucket settings make no sub-image frames; "
             "lower image_min_length or image_buckets_step to get some")
    flat = [Path(p) for pair in pairs for p in pair]
    infos = probe_all(flat)
    if all(a is None or b is None for a, b in zip(infos[0::2], infos[1::2])):
        raise DataError(f"none of the {len(pairs)} image pairs can be used: in each, at least one image could not "
                        "be read (see the warnings above for which and why)")
    specs: list[PairSampleSpec] = []
    for (orig_path, target_path), a, b in zip(pairs, infos[0::2], infos[1::2]):
        if a is None or b is None:
            continue
        common = ImageInfo(width=min(a.width, b.width), height=min(a.height, b.height),
                           has_alpha=a.has_alpha or b.has_alpha)
        placements, skipped = plan_geometry(common, main, sub, sub_image_num=n_sub, mirroring=mirroring,
                                            disable_upscale=disable_upscale)
        if skipped:
            warn_upscale(orig_path, common.width, common.height, skipped)
        orig = make_item(orig_path, trigger_word=trigger_word, use_filename_as_tag=use_filename_as_tag)
        target = make_item(target_path, trigger_word=trigger_word, use_filename_as_tag=use_filename_as_tag)
        start = len(specs)
        specs.extend(
            PairSampleSpec(orig=orig, target=target, orig_size=(a.width, a.height), target_size=(b.width, b.height),
                           common_size=(common.width, common.height), index=start + k, **p)
            for k, p in enumerate(placements)
        )
    if not specs:
        raise nothing_fits(sum(a is not None and b is not None for a, b in zip(infos[0::2], infos[1::2])))
    return specs


def difference_mask(orig: np.ndarray, target: np.ndarray, threshold: float = DIFF_THRESHOLD) -> np.ndarray:
    """1 where the pair differs: sum over RGB of |orig - target| (0..255 scale) > ``threshold``.

    Takes pixels as ``load`` returns them, float arrays (..., 3, H, W) in [-1, 1]; returns a
    float32 (..., H, W) mask of 0 and 1.
    """
    orig, target = np.asarray(orig, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if orig.shape != target.shape or orig.ndim < 3 or orig.shape[-3] != 3:
        raise ValueError(f"difference_mask needs two RGB arrays of the same shape (..., 3, H, W); "
                         f"got {orig.shape} and {target.shape}")
    total = np.abs(orig - target).sum(axis=-3) * 127.5
    # Rounding to 1e-3 keeps an exact integer difference from tipping over by float noise.
    return (np.round(total, 3) > threshold).astype(np.float32)
