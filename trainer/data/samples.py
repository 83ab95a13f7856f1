"""Training-sample plans: which image goes to which bucket, resized and cropped how (SPEC.md §5.4).

A plan is a list of small recipes (``SampleSpec``), not pixels, so planning a large folder
costs no memory; each recipe loads its pixels when the latent cache asks for them. Every
image goes to its nearest-ratio main bucket, optionally to the ``sub_image_num`` nearest
sub-image buckets, and each of those copies optionally also mirrored: one image with 3 sub
images and mirroring makes 8 samples.

Unreadable images are skipped with a DataWarning naming the file; a plan with nothing left
raises DataError. The sub-image choice takes each frame at most once (see
``frames.nearest_sub_buckets``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from trainer.data.errors import DataError, DataWarning, ImageLoadError
from trainer.data.frames import Frame, fit_to_bucket, make_buckets, nearest_bucket, nearest_sub_buckets, needs_upscale
from trainer.data.images import ImageInfo, ImageItem, open_image, probe_image, to_arrays


@dataclass(frozen=True, kw_only=True)
class Placement:
    """Where one training sample sits: its bucket and how the source is resized, cropped, flipped.

    ``bucket``, ``resized_size`` are (width, height); ``crop_box`` is (left, top, right,
    bottom) in resized pixels. ``original_size`` (height, width) and ``crop_top_left``
    (top, left) are what SDXL's size/crop conditioning wants; for a flipped sample the crop
    offset is measured from the mirrored side. ``index`` is the sample's position in its plan.
    """

    bucket: Frame
    resized_size: Frame
    crop_box: tuple[int, int, int, int]
    flip: bool
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    sub: bool = False
    index: int = 0


def placement_fields(width: int, height: int, bucket: Frame, *, flip: bool, sub: bool) -> dict[str, Any]:
    """The Placement fields for a ``width`` x ``height`` source in ``bucket``."""
    resized, box = fit_to_bucket(width, height, bucket)
    left, top, right, _ = box
    # Mirrored, the kept region starts (resized width - right) pixels from the new left edge.
    crop_left = resized[0] - right if flip else left
    return dict(bucket=bucket, resized_size=resized, crop_box=box, flip=flip,
                original_size=(height, width), crop_top_left=(top, crop_left), sub=sub)


def render(image: Image.Image, placement: Placement) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize (bicubic), crop and flip ``image`` as ``placement`` says; see ``images.to_arrays``."""
    out = image.resize(placement.resized_size, Image.Resampling.BICUBIC).crop(placement.crop_box)
    if placement.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_arrays(out)


def open_checked(path, width: int, height: int) -> Image.Image:
    """Open ``path`` and make sure it still has the size it had when it was planned."""
    image = open_image(path)
    if image.size != (width, height):
        raise ImageLoadError(f"image {path} changed since the samples were planned "
                             f"(was {width}x{height}, now {image.width}x{image.height}); plan again")
    return image


@dataclass(frozen=True, kw_only=True)
class SampleSpec(Placement):
    """Recipe for one training sample of one image (see Placement for the geometry fields)."""

    item: ImageItem

    @property
    def source_key(self) -> tuple:
        """Samples with the same key read the same source file(s)."""
        return (self.item.path,)

    def open_sources(self) -> tuple[Image.Image]:
        """The decoded source image (raises ImageLoadError naming the file)."""
        return (open_checked(self.item.path, self.original_size[1], self.original_size[0]),)

    def render(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
        """Pixels (3, H, W) float32 in [-1, 1] and mask (H, W) or None, from the opened source."""
        return render(image, self)

    def load(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Read the file and return ``(pixels, mask)``; mask is None when the source has no alpha."""
        return self.render(*self.open_sources())


def plan_geometry(
    info: ImageInfo, main: list[Frame], sub: list[Frame], *, sub_image_num: int, mirroring: bool,
    disable_upscale: bool,
) -> tuple[list[dict[str, Any]], list[Frame]]:
    """Placement fields of every sample of one source, and the frames skipped to avoid upscaling."""
    frames = [(nearest_bucket(info.width, info.height, main), False)]
    frames += [(f, True) for f in nearest_sub_buckets(info.width, info.height, sub, sub_image_num)]
    placements, skipped = [], []
    for frame, is_sub in frames:
        if disable_upscale and needs_upscale(info.width, info.height, frame):
            skipped.append(frame)
            continue
        for flip in (False, True) if mirroring else (False,):
            placements.append(placement_fields(info.width, info.height, frame, flip=flip, sub=is_sub))
    return placements, skipped


def warn(message: str) -> None:
    """Report a skipped file; training goes on."""
    warnings.warn(message, DataWarning, stacklevel=3)


def warn_upscale(path, width: int, height: int, skipped: list[Frame]) -> None:
    """Say which frames an image was left out of because image_disable_upscale is on."""
    frames = ", ".join(f"{w}x{h}" for w, h in skipped)
    warn(f"{path} ({width}x{height}) is smaller than bucket {frames} (width x height) and "
         "image_disable_upscale is on, so it is not used there")


def probe_all(paths: Sequence) -> list[ImageInfo | None]:
    """Probe every path; unreadable ones warn (naming the file) and give None."""
    infos: list[ImageInfo | None] = []
    for path in paths:
        try:
            infos.append(probe_image(path))
        except ImageLoadError as exc:
            warn(f"skipping {exc}")
            infos.append(None)
    return infos


def check_count(value) -> int:
    """``sub_image_num`` as an int >= 0, else ValueError."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not number.is_integer() or number < 0:
        raise ValueError(f"sub_image_num {value!r} is not valid: it must be a whole number >= 0")
    return int(number)


def none_readable(paths: Sequence) -> DataError:
    """The error for a plan where no source could be read."""
    names = ", ".join(str(p) for p in list(paths)[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
    return DataError(f"none of the {len(paths)} images could be read ({names}); "
                     "see the warnings above for why each was skipped")


def nothing_fits(count: int) -> DataError:
    """The error for a plan where image_disable_upscale left nothing."""
    return DataError(f"all {count} readable images are smaller than their buckets and image_disable_upscale is on; "
                     "turn image_disable_upscale off, or lower image_size / image_min_length")


def plan_samples(
    items: Sequence[ImageItem], size, step: int, min_length: int, max_ratio: float,
    sub_image_num: int = 0, mirroring: bool = False, disable_upscale: bool = False,
) -> list[SampleSpec]:
    """Recipes for every training sample of ``items`` (SPEC.md §5.4).

    ``size`` is the image size as ``parse_image_size`` takes it. Per image, in order: the main
    bucket copy, its mirror, then each sub-image copy and its mirror. Raises ValueError for bad
    bucket settings and DataError when no image is usable.
    """
    main, sub = make_buckets(size, step, min_length, max_ratio)
    n_sub = check_count(sub_image_num)
    if not items:
        raise DataError("no images to plan: the image list is empty")
    if n_sub and not sub:
        warn(f"sub_image_num is {n_sub} but image_size {size!r}, step {step} and min length {min_length} make "
             "no sub-image frames; lower image_min_length or image_buckets_step to get some")
    paths = [item.path for item in items]
    infos = probe_all(paths)
    if all(info is None for info in infos):
        raise none_readable(paths)
    specs: list[SampleSpec] = []
    for item, info in zip(items, infos):
        if info is None:
            continue
        placements, skipped = plan_geometry(info, main, sub, sub_image_num=n_sub, mirroring=mirroring,
                                            disable_upscale=disable_upscale)
        if skipped:
            warn_upscale(item.path, info.width, info.height, skipped)
        start = len(specs)
        specs.extend(SampleSpec(item=item, index=start + k, **p) for k, p in enumerate(placements))
    if not specs:
        raise nothing_fits(sum(info is not None for info in infos))
    return specs


def group_by_bucket(specs: Iterable) -> dict[Frame, list]:
    """Samples per bucket ``(width, height)``, in plan order within each bucket."""
    groups: dict[Frame, list] = {}
    for spec in specs:
        groups.setdefault(spec.bucket, []).append(spec)
    return groups


def bucket_indices(specs: Iterable) -> dict[Frame, list[int]]:
    """Positions of the samples in ``specs``, per bucket."""
    groups: dict[Frame, list[int]] = {}
    for position, spec in enumerate(specs):
        groups.setdefault(spec.bucket, []).append(position)
    return groups


def iter_loaded(specs: Sequence, on_skip: Callable[[int, Exception], None] | None = None) -> Iterator[tuple[int, tuple]]:
    """Yield ``(position, spec.load() result)`` for every sample, decoding each source once.

    Samples of the same source (mirrors, sub images) are rendered from one decode. A source
    that cannot be read is skipped with a DataWarning (and ``on_skip(position, error)`` for
    each of its samples); the others go on.
    """
    by_source: dict[tuple, list[int]] = {}
    for position, spec in enumerate(specs):
        by_source.setdefault(spec.source_key, []).append(position)
    for positions in by_source.values():
        try:
            sources = specs[positions[0]].open_sources()
        except ImageLoadError as exc:
            warn(f"skipping {exc}")
            for position in positions:
                if on_skip is not None:
                    on_skip(position, exc)
            continue
        for position in positions:
            yield position, specs[position].render(*sources)
