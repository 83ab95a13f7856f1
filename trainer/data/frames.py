"""Bucket frames: generation, nearest-ratio choice and resize/crop geometry (SPEC.md §5.3, §5.4).

Pure functions on integers; no image is touched here. Tuples are ``(width, height)`` in
pixels, as in the reference; only the user-facing ``image_size`` string and the ``buckets``
command speak ``(height, width)``.

Hand-written rather than taken from diffusers' ``generate_aspect_ratio_buckets``: the
reference's frame set (fixed pixel budget, step-rounded heights, a separate sub-image set) is
part of the product's behaviour, and no library reproduces it.

Differences from the reference, on purpose: a step, minimum length or ratio that would hang
or divide by zero raises ValueError; ratio bounds are compared exactly (fractions) instead of
in floating point; frames of equal ratio are ordered larger first, which is the order the
worked examples of SPEC.md §5.3 show.
"""

from __future__ import annotations

from fractions import Fraction

Frame = tuple[int, int]  # (width, height)


def parse_image_size(value: str | int | tuple | list) -> tuple[int, int]:
    """``"768,512"`` -> ``(768, 512)`` as (height, width); one value means a square.

    Also accepts an int or a 1-2 item sequence. Raises ValueError naming the bad value.
    """
    allowed = 'one positive whole number ("512") or two separated by a comma ("768,512")'
    if isinstance(value, bool):
        raise ValueError(f"image_size(height, width) {value!r} is not valid: give {allowed}")
    if isinstance(value, int):
        parts: list = [value]
    elif isinstance(value, (tuple, list)):
        parts = list(value)
    else:
        parts = [p.strip() for p in str(value).split(",")]
    if not 1 <= len(parts) <= 2:
        raise ValueError(f"image_size(height, width) {value!r} is not valid: give {allowed}")
    numbers = []
    for part in parts:
        try:
            number = int(part)
        except (TypeError, ValueError):
            raise ValueError(f"image_size(height, width) {value!r} is not valid: {part!r} is not a whole number; "
                             f"give {allowed}") from None
        if number <= 0:
            raise ValueError(f"image_size(height, width) {value!r} is not valid: sides must be > 0; give {allowed}")
        numbers.append(number)
    if len(numbers) == 1:
        numbers.append(numbers[0])
    return numbers[0], numbers[1]


def _whole(value, name: str, rule: str) -> int:
    """``value`` as an int (ints, integral floats and digit strings pass), else ValueError."""
    try:
        number = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        number = float("nan")
    if not number.is_integer() or number <= 0:
        raise ValueError(f"{name} {value!r} is not valid: {rule}")
    return int(number)


def _check_bucket_args(step, min_length, max_ratio) -> tuple[int, int, float]:
    step = _whole(step, "image_buckets_step", "it must be a whole number of pixels > 0 (for example 64, 128 or 256)")
    min_length = _whole(min_length, "image_min_length", "it must be a whole number of pixels > 0")
    try:
        ratio = float(max_ratio)
    except (TypeError, ValueError):
        ratio = float("nan")
    if not ratio >= 1.0 or ratio == float("inf"):
        raise ValueError(f"image_max_ratio {max_ratio!r} is not valid: it must be a number >= 1 "
                         "(the largest allowed width/height or height/width)")
    return step, min_length, ratio


def _sort_by_ratio(frames: set[Frame]) -> list[Frame]:
    # Ratio ascending; equal ratios larger first (the order SPEC.md §5.3 shows).
    return sorted(frames, key=lambda f: (Fraction(f[0], f[1]), -f[0]))


def make_buckets(
    size: str | int | tuple | list, step: int, min_length: int, max_ratio: float
) -> tuple[list[Frame], list[Frame]]:
    """The main and sub-image bucket frames for ``size`` (SPEC.md §5.3).

    ``size`` is ``(height, width)`` or anything ``parse_image_size`` accepts; like the
    reference, only the sorted sides matter. Returns ``(main, sub)``, lists of
    ``(width, height)`` sorted by width/height. Raises ValueError for a step, minimum
    length or ratio that cannot make frames.
    """
    short, long = sorted(parse_image_size(size))
    step, min_length, max_ratio = _check_bucket_args(step, min_length, max_ratio)
    budget = short * long
    limit = Fraction(max_ratio)

    def ratio_ok(w: int, h: int) -> bool:
        return 1 / limit <= Fraction(w, h) <= limit

    main: set[Frame] = {(short, short)}
    for w in range(min_length, long + 1, step):
        h = min(long, (budget // w) // step * step)
        # h is 0 when the budget left for this width is under one step; no frame fits.
        if h > 0 and ratio_ok(w, h):
            main.update({(w, h), (h, w)})
    sub: set[Frame] = set()
    sides = range(min_length, long + 1, step)
    for w in sides:
        for h in sides:
            if w * h <= budget and ratio_ok(w, h):
                sub.update(f for f in ((w, h), (h, w)) if f not in main)
    return _sort_by_ratio(main), _sort_by_ratio(sub)


def ratio_errors(width: int, height: int, frames: list[Frame]) -> list[float]:
    """Signed error ``frame_ratio - image_ratio`` of each frame (ratios are width/height)."""
    ratio = width / height
    return [w / h - ratio for w, h in frames]


def nearest_bucket(width: int, height: int, buckets: list[Frame]) -> Frame:
    """The frame whose width/height is nearest the image's; the first one wins a tie."""
    if not buckets:
        raise ValueError("no bucket frames to choose from")
    errors = ratio_errors(width, height, buckets)
    best = min(range(len(buckets)), key=lambda i: abs(errors[i]))
    return buckets[best]


def nearest_sub_buckets(width: int, height: int, sub: list[Frame], n: int) -> list[Frame]:
    """The ``n`` sub-image frames nearest in ratio, nearest first, each at most once.

    The reference picked the nearest frame ``n`` times, adding 1 to each picked error; that
    is this same order whenever it does not pick a frame twice. Fewer than ``n`` frames are
    returned when fewer exist.
    """
    if n < 0:
        raise ValueError(f"sub_image_num {n!r} is not valid: it must be a whole number >= 0")
    errors = ratio_errors(width, height, sub)
    order = sorted(range(len(sub)), key=lambda i: abs(errors[i]))  # stable: ties keep list order
    return [sub[i] for i in order[:n]]


def fit_to_bucket(width: int, height: int, bucket: Frame) -> tuple[Frame, tuple[int, int, int, int]]:
    """Resize size and centre-crop box that fit a ``width`` x ``height`` image into ``bucket``.

    When the frame is no wider than the image (signed error <= 0) the height is scaled to the
    frame and the width centre-cropped; otherwise the width is scaled and the height
    cropped. Returns ``((resized_w, resized_h), (left, top, right, bottom))``, the box in
    resized pixels.
    """
    bw, bh = bucket
    if bw / bh - width / height <= 0:
        # Integer maths avoids the float round-down that could leave the image a pixel short.
        rw, rh = max(bw, width * bh // height), bh
    else:
        rw, rh = bw, max(bh, height * bw // width)
    left, top = (rw - bw) // 2, (rh - bh) // 2
    return (rw, rh), (left, top, left + bw, top + bh)


def needs_upscale(width: int, height: int, bucket: Frame) -> bool:
    """True when fitting the image into ``bucket`` would enlarge it along the fitted side."""
    bw, bh = bucket
    if bw / bh - width / height <= 0:
        return height < bh
    return width < bw
