"""Buckets: the public entry points for frames, sample plans and batching.

The work lives in ``frames`` (pure frame maths), ``samples`` (per-image plans) and
``batching`` (seeded, resumable batch order); this module gathers them under one name and
formats the frames that ``python -m trainer buckets`` (``trainer/cli/buckets.py``) prints.
"""

from __future__ import annotations

from trainer.data.batching import BucketBatcher
from trainer.data.frames import (
    Frame, fit_to_bucket, make_buckets, nearest_bucket, nearest_sub_buckets, needs_upscale, parse_image_size,
)
from trainer.data.samples import Placement, SampleSpec, bucket_indices, group_by_bucket, iter_loaded, plan_samples

__all__ = [
    "BucketBatcher", "Frame", "Placement", "SampleSpec", "bucket_indices", "fit_to_bucket",
    "format_frames", "group_by_bucket", "iter_loaded", "make_buckets", "nearest_bucket", "nearest_sub_buckets",
    "needs_upscale", "parse_image_size", "plan_samples",
]

SUB_HEADER = "# sub-image frames"


def format_frames(size: str, step: int, min_length: int, max_ratio: float) -> list[str]:
    """The ``buckets`` command's lines: frames as ``(h, w)``, then the sub-image frames.

    Raises ValueError for settings that cannot make frames.
    """
    main, sub = make_buckets(size, step, min_length, max_ratio)
    lines = [f"({h}, {w})" for w, h in main]
    lines.append(SUB_HEADER)
    if sub:
        lines += [f"({h}, {w})" for w, h in sub]
    else:
        lines.append("# none: lower --min-length (or --step) to get sub-image frames")
    return lines
