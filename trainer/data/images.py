"""Image discovery, captions, probing and loading (SPEC.md §5.1, §5.2, §5.5).

Discovery walks a folder recursively and pairs every image with its caption. Two quirks of
the reference are fixed here, on purpose:

- Extensions are matched on the real extension and case-insensitively, so ``photo.PNG`` is
  found (the reference tested ``name.endswith("png")`` and missed it), and a file named
  ``notapng`` is not taken for an image.
- An empty trigger word does not leave a leading ``", "`` in the prompt, and caption files
  are stripped of surrounding whitespace and a UTF-8 byte-order mark.

Further changes, each documented where it happens: hidden folders (name starting with ``.``)
are skipped like hidden files; EXIF orientation is applied, so an image trains the way every
viewer shows it; alpha masks come from any mode with transparency (``LA``, ``PA``, palette
or colour-key transparency), not only ``RGBA``.

Pillow does all decoding. Probing decodes each image once (JPEGs at 1/8 scale through
Pillow's draft mode) so truncated files are found when the samples are planned, not halfway
through latent caching.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from trainer.compat import is_16bit_gray
from trainer.data.errors import DataError, ImageLoadError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif", "tif", "tiff", "bmp", "webp", "pcx", "ico")
_EXTENSION_SET = frozenset(IMAGE_EXTENSIONS)
# The suffix the reference's Image tab appends to augmented copies; filename-as-tag cuts it off.
_ID_MARK = "_id_"
_EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
# alpha > 0.1 on the 0..1 scale, as the reference thresholds it.
ALPHA_THRESHOLD = 0.1


@dataclass(frozen=True)
class ImageItem:
    """One training image and the prompt it trains with."""

    path: Path
    prompt: str
    tags: tuple[str, ...]
    caption_file: Path | None = None


@dataclass(frozen=True)
class ImageInfo:
    """What planning needs to know about an image: upright size and whether it has alpha."""

    width: int
    height: int
    has_alpha: bool


def is_image_name(name: str) -> bool:
    """True when ``name`` has one of IMAGE_EXTENSIONS as its extension, in any letter case."""
    suffix = os.path.splitext(name)[1]
    return suffix[1:].lower() in _EXTENSION_SET


def check_folder(folder: str | os.PathLike) -> Path:
    """Return ``folder`` as a Path, or raise DataError when it is missing or a file."""
    if folder is None or str(folder).strip() == "":
        raise DataError("no image folder given: set the folder that holds the training images")
    path = Path(folder).expanduser()
    if not path.exists():
        raise DataError(f"image folder {path} does not exist; give the folder that holds the training images")
    if not path.is_dir():
        raise DataError(f"{path} is a file, not a folder; give the folder that holds the training images")
    return path


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """All image files under ``folder`` (recursive, sorted, hidden files and folders skipped)."""
    root = check_folder(folder)
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Hidden folders (.thumbnails, .ipynb_checkpoints, ...) hold copies, not training data.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / n for n in sorted(filenames) if not n.startswith(".") and is_image_name(n))
    if not found:
        raise DataError(
            f"no images found in {root}; supported: {', '.join(IMAGE_EXTENSIONS)} (any letter case); "
            "files and folders whose names start with '.' are skipped"
        )
    return found


def _sidecar(image: Path, ext: str) -> Path | None:
    """The caption file ``<stem><ext>`` next to ``image`` (lower- or upper-case extension)."""
    for candidate in (image.with_suffix(ext), image.with_suffix(ext.upper())):
        if candidate.is_file():
            return candidate
    return None


def read_caption(path: Path) -> str:
    """Caption text of ``path``: UTF-8 (a BOM is dropped), surrounding whitespace stripped."""
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        raise DataError(f"caption file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                        "save it as UTF-8") from exc
    except OSError as exc:
        raise DataError(f"cannot read caption file {path}: {exc.strerror or exc}") from exc


def filename_tags(image: Path) -> str:
    """The filename-as-tag caption: stem cut at the first ``_id_``, every ``_`` made a ``,``."""
    return image.stem.split(_ID_MARK, 1)[0].replace("_", ",")


def join_prompt(trigger_word: str, caption: str) -> str:
    """``trigger, caption``; either part may be empty and then no separator is left behind."""
    parts = [p for p in (trigger_word.strip(), caption.strip()) if p]
    return ", ".join(parts)


def split_tags(prompt: str) -> tuple[str, ...]:
    """Comma-separated pieces of ``prompt``, stripped, empty pieces dropped."""
    return tuple(t for t in (piece.strip() for piece in prompt.split(",")) if t)


def make_item(path: str | os.PathLike, *, trigger_word: str = "", use_filename_as_tag: bool = False) -> ImageItem:
    """Build the ImageItem of one image with the caption rules of SPEC.md §5.2.

    Order: the file name (when ``use_filename_as_tag``), else ``<stem>.txt``, else
    ``<stem>.caption``, else the trigger word alone.
    """
    image = Path(path)
    caption, source = "", None
    if use_filename_as_tag:
        caption = filename_tags(image)
    else:
        source = _sidecar(image, ".txt") or _sidecar(image, ".caption")
        if source is not None:
            caption = read_caption(source)
    prompt = join_prompt(trigger_word or "", caption)
    return ImageItem(path=image, prompt=prompt, tags=split_tags(prompt), caption_file=source)


def discover_images(
    folder: str | os.PathLike, *, trigger_word: str = "", use_filename_as_tag: bool = False
) -> list[ImageItem]:
    """Every image under ``folder`` with its prompt (SPEC.md §5.1, §5.2).

    Raises DataError for a missing folder, a path that is a file, or a folder with no images.
    Images are not opened here; planning probes them (see ``probe_image``).
    """
    items = [make_item(p, trigger_word=trigger_word, use_filename_as_tag=use_filename_as_tag)
             for p in list_image_files(folder)]
    with_caption = sum(1 for i in items if i.caption_file is not None)
    log.info("%d images in %s, %d with a caption file", len(items), folder, with_caption)
    return items


def tag_frequency(items: list[ImageItem], folder: str | os.PathLike) -> dict[str, dict[str, int]]:
    """Tag counts of the images of the dataset folder ``folder``, in the ``ss_tag_frequency`` shape
    sd-scripts writes: ``{"<folder name>": {tag: count}}``, tags lower-cased, each image once.

    The reference wrote ``{"1": {...}}`` and counted every mirrored and sub-image copy too; the
    folder name is what metadata readers (e.g. A1111's additional-networks) show.
    """
    counts: Counter[str] = Counter()
    for item in dict.fromkeys(items):  # an image planned several times (sub-images, mirroring) counts once
        counts.update(tag.lower() for tag in item.tags)
    return {Path(folder).expanduser().resolve().name or str(folder): dict(counts)}


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except (TypeError, ValueError):
        return 1  # an unreadable EXIF block is not a reason to drop the image


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in _ALPHA_MODES or "transparency" in im.info


def _unreadable(path: Path, exc: BaseException) -> ImageLoadError:
    detail = str(exc) or type(exc).__name__
    return ImageLoadError(f"cannot read image {path}: {detail} (is the file corrupt or not really an image?)")


def probe_image(path: str | os.PathLike) -> ImageInfo:
    """Decode ``path`` once to prove it is readable; return its upright size and alpha flag.

    Raises ImageLoadError (naming the file) for a missing, truncated or non-image file.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            width, height = im.size
            if _orientation(im) in (5, 6, 7, 8):  # EXIF rotations by 90 degrees swap the sides
                width, height = height, width
            has_alpha = _has_alpha(im)
            if im.format == "JPEG":
                # A 1/8-scale decode still reads the whole stream, so truncation shows, cheaply.
                im.draft(None, (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except MemoryError:
        raise
    except Exception as exc:  # Pillow's decoders raise many types (OSError, SyntaxError, struct.error...)
        raise _unreadable(path, exc) from exc
    return ImageInfo(width=width, height=height, has_alpha=has_alpha)


def _to_8bit(im: Image.Image, sixteen_bit: bool) -> Image.Image:
    """16-bit and float grayscale to 8-bit ``L``; Pillow's own conversion would clip them."""
    arr = np.asarray(im, dtype=np.float32)
    if sixteen_bit:
        arr = arr / 257.0
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open ``path`` upright (EXIF applied) as ``RGBA`` when it has transparency, else ``RGB``.

    Raises ImageLoadError naming the file when it cannot be decoded.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            sixteen_bit = is_16bit_gray(im)  # before the transpose: a transposed copy has no format
            if _orientation(im) != 1:
                im = ImageOps.exif_transpose(im)
            if im.mode.startswith(("I", "F")):
                im = _to_8bit(im, sixteen_bit)
            return im.convert("RGBA" if _has_alpha(im) else "RGB")
    except MemoryError:
        raise
    except Exception as exc:  # see probe_image
        raise _unreadable(path, exc) from exc


def to_arrays(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """RGB pixels as float32 (3, H, W) in [-1, 1], and the alpha mask (H, W) or None.

    The mask is 1 where alpha > 0.1 and 0 elsewhere. Alpha is dropped from the pixels, not
    composited onto a background, as the reference does (SPEC.md §5.5).
    """
    arr = np.asarray(image)
    if arr.ndim == 2:  # the callers pass RGB/RGBA; a bare L image is accepted too
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    mask = None
    if arr.shape[2] == 4:
        mask = (arr[:, :, 3].astype(np.float32) / 255.0 > ALPHA_THRESHOLD).astype(np.float32)
    pixels = arr[:, :, :3].astype(np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    return np.ascontiguousarray(pixels), mask
