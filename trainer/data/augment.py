"""The Image tab's augmentation helper (SPEC.md §10): rotated, shrunk and mirrored copies of images.

``augment_folder`` makes ``count`` copies of every image directly inside a folder; ``augment_file``
makes them of one image. Each copy is, in this order: mirrored left-right (``mirror``: every other
copy, starting with the second, so half the copies face each way), rotated by a uniform angle in
±``max_angle`` degrees on an expanded canvas (``change_angle``), and shrunk by a uniform factor in
[``min_scale``, 1] onto a transparent canvas of the original size (``change_scale``), placed at
random or pinned to one edge (``fix_side``).

Copies are named ``<stem>_id_<i><suffix>`` (the mark that filename-as-tag cuts off), written next to
the originals or into a chosen folder, and a caption file beside an original is copied beside its
copies. Differences from the reference, on purpose:

- Pillow 10 removed the resampling constants the reference used; ``Image.Resampling`` (Pillow 9.1+)
  works on every Pillow the hosts ship.
- A file that exists is never replaced: every target name is checked before anything is written,
  and the whole request is refused with the names that exist (so a second run never overwrites
  the first run's copies, nor an original that happens to have such a name).
- JPEG cannot hold transparency, so a JPEG copy has its transparent canvas filled with white
  (the reference failed on RGBA -> JPEG); PNG and WebP copies keep the transparency.
- The suffix is the original's (the reference doubled the dot), and files already named
  ``..._id_<n>`` (earlier copies) are not taken as originals.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from trainer.atomic import atomic_path, write_bytes
from trainer.data.errors import DataError

SOURCE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FIX_SIDES = ("none", "right", "left", "top", "bottom")
CAPTION_EXTENSIONS = (".txt", ".caption")
_COPY = re.compile(r"_id_\d+$")
MAX_COUNT = 1000
_SAVE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}


@dataclass(frozen=True)
class AugmentOptions:
    """What each copy gets; the defaults are the reference's."""

    count: int = 5
    change_angle: bool = True
    max_angle: float = 180.0
    change_scale: bool = True
    min_scale: float = 0.4
    fix_side: str = "none"
    mirror: bool = False
    seed: int | None = None

    def check(self) -> None:
        """Raise DataError naming the setting that is out of range."""
        problems = []
        if not 1 <= int(self.count) <= MAX_COUNT:
            problems.append(f"number of images must be 1..{MAX_COUNT} (got {self.count})")
        if not 0 <= float(self.max_angle) <= 180:
            problems.append(f"max tilting angle must be 0..180 degrees (got {self.max_angle})")
        if not 0 < float(self.min_scale) <= 1:
            problems.append(f"minimum downscale ratio must be above 0 and at most 1 (got {self.min_scale})")
        if self.fix_side not in FIX_SIDES:
            problems.append(f"fix side must be one of {', '.join(FIX_SIDES)} (got {self.fix_side!r})")
        if not (self.change_angle or self.change_scale or self.mirror):
            problems.append("nothing to change: tick change angle, change scale or mirror")
        if problems:
            raise DataError("; ".join(problems))


@dataclass
class AugmentResult:
    written: list = field(default_factory=list)   # image copies, in order
    captions: list = field(default_factory=list)  # caption files copied beside them

    def summary(self) -> str:
        if not self.written:
            return "Nothing written."
        folders = sorted({str(p.parent) for p in self.written})
        note = f" and {len(self.captions)} caption file(s)" if self.captions else ""
        return f"Wrote {len(self.written)} image(s){note} to {', '.join(folders)}"


def transform(image: Image.Image, options: AugmentOptions, rng: random.Random, index: int = 0) -> Image.Image:
    """One augmented copy of ``image`` (returned as RGBA)."""
    out = image.convert("RGBA")
    if options.mirror and index % 2 == 1:
        out = ImageOps.mirror(out)
    if options.change_angle and options.max_angle > 0:
        angle = rng.uniform(-float(options.max_angle), float(options.max_angle))
        out = out.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=(0, 0, 0, 0))
    if options.change_scale:
        scale = rng.uniform(float(options.min_scale), 1.0)
        canvas_size = out.size
        small = (max(1, round(out.width * scale)), max(1, round(out.height * scale)))
        shrunk = out.resize(small, resample=Image.Resampling.LANCZOS)
        canvas = Image.new("RGBA", canvas_size, (0, 0, 0, 0))
        canvas.paste(shrunk, _position(canvas_size, small, options.fix_side, rng), shrunk)
        out = canvas
    return out


def _position(canvas: tuple[int, int], size: tuple[int, int], side: str, rng: random.Random) -> tuple[int, int]:
    room_x, room_y = canvas[0] - size[0], canvas[1] - size[1]
    x, y = rng.randint(0, room_x), rng.randint(0, room_y)
    if side == "left":
        x = 0
    elif side == "right":
        x = room_x
    elif side == "top":
        y = 0
    elif side == "bottom":
        y = room_y
    return x, y


def source_images(folder: str | Path) -> list[Path]:
    """The images directly in ``folder`` that the helper copies (earlier ``_id_<n>`` copies and hidden files left out)."""
    root = Path(folder).expanduser() if str(folder).strip() else None
    if root is None:
        raise DataError("no image folder given: type the folder that holds the images to copy")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; type the folder that holds the images to copy")
    found = sorted(p for p in root.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in SOURCE_EXTENSIONS
                   and not _COPY.search(p.stem))
    if not found:
        raise DataError(f"no images to copy in {root} ({', '.join(SOURCE_EXTENSIONS)}; "
                        "earlier _id_<n> copies are not copied again)")
    return found


def _caption_of(image: Path) -> Path | None:
    for ext in CAPTION_EXTENSIONS:
        candidate = image.with_suffix(ext)
        if candidate.is_file():
            return candidate
    return None


def _plan(sources: list[tuple[Path, str]], out_dir: Path | None, count: int, suffix: str | None):
    """(source, image target, caption source, caption target) per copy; refuses when a target exists."""
    plan, taken = [], []
    for source, stem in sources:
        folder = out_dir or source.parent
        caption = _caption_of(source)
        for i in range(count):
            target = folder / f"{stem}_id_{i}{suffix or source.suffix.lower()}"
            cap_target = target.with_suffix(caption.suffix) if caption else None
            taken += [p for p in (target, cap_target) if p is not None and p.exists()]
            plan.append((source, target, caption, cap_target))
    if taken:
        shown = ", ".join(str(p) for p in taken[:5]) + (f" and {len(taken) - 5} more" if len(taken) > 5 else "")
        raise DataError(f"not written: {len(taken)} file(s) exist and are never replaced: {shown}. "
                        "Choose another output folder, or move those files away and press again.")
    return plan


def _save(image: Image.Image, path: Path) -> None:
    fmt = _SAVE_FORMATS.get(path.suffix.lower(), "PNG")
    if fmt in ("JPEG", "BMP"):  # no transparency there: the empty canvas becomes white
        flat = Image.new("RGB", image.size, (255, 255, 255))
        flat.paste(image, (0, 0), image)
        image = flat
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt)


def _run(plan, options: AugmentOptions, log=None) -> AugmentResult:
    rng = random.Random(options.seed)
    result = AugmentResult()
    opened: dict[Path, Image.Image] = {}
    for n, (source, target, caption, cap_target) in enumerate(plan):
        if source not in opened:
            opened.clear()
            opened[source] = _open(source)
        index = int(target.stem.rsplit("_id_", 1)[1])
        target.parent.mkdir(parents=True, exist_ok=True)
        _save(transform(opened[source], options, rng, index), target)
        result.written.append(target)
        if caption is not None:
            write_bytes(cap_target, caption.read_bytes())
            result.captions.append(cap_target)
        if log is not None:
            log(f"{n + 1}/{len(plan)}: {target.name}")
    return result


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im)
    except Exception as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc


def augment_folder(folder: str | Path, options: AugmentOptions, out_dir: str | Path | None = None,
                   log=None) -> AugmentResult:
    """Copies of every image directly in ``folder``, next to them or into ``out_dir``."""
    options.check()
    out = Path(out_dir).expanduser() if out_dir and str(out_dir).strip() else None
    sources = [(p, p.stem) for p in source_images(folder)]
    return _run(_plan(sources, out, int(options.count), None), options, log)


def augment_file(image: str | Path, options: AugmentOptions, out_dir: str | Path | None = None,
                 name: str = "", log=None) -> AugmentResult:
    """Copies of one image as ``<name>_id_<i>.png`` (``name`` defaults to the image's stem), into
    ``out_dir`` (default: the image's folder)."""
    options.check()
    source = Path(image) if image else None
    if source is None or not source.is_file():
        raise DataError("no image given: upload an image (or use From Directory)")
    stem = (name or "").strip() or source.stem
    if "/" in stem or "\\" in stem:
        raise DataError(f"output name {stem!r} must be a file name without folders; put the folder in Output directory")
    out = Path(out_dir).expanduser() if out_dir and str(out_dir).strip() else None
    return _run(_plan([(source, stem)], out, int(options.count), ".png"), options, log)
