"""The package versions TrainTrain runs on, and every difference between them, in one place.

Inside a web UI the trainer runs on the UI's own transformers, accelerate, huggingface_hub, numpy,
safetensors and torch: install.py never changes them. The supported range is therefore set by what
the web UIs pin (their ``requirements_versions.txt``):

==================  ============  ==========  ===============  =========  =======  ===========
web UI              transformers  accelerate  huggingface_hub  diffusers  numpy    safetensors
==================  ============  ==========  ===============  =========  =======  ===========
AUTOMATIC1111 1.7   4.30.2        0.21.0      (not pinned)     (none)     1.23.5   0.3.1
AUTOMATIC1111 1.8+  4.30.2        0.21.0      (not pinned)     (none)     1.26.2   0.4.2
Forge (2025)        4.46.1        0.31.0      0.26.2           0.31.0     1.26.2   0.4.2
reForge             4.48.1        0.21.0      0.25.0           0.32.2     1.26.4   0.5.2
==================  ============  ==========  ===============  =========  =======  ===========

So the floor is transformers 4.30, accelerate 0.21, safetensors 0.3, numpy 1.23, with
diffusers >= 0.31 (install.py picks a diffusers release that imports beside the installed
transformers; see its table). Standalone installs get current releases (transformers 5).

Differences handled here:

- transformers 5 keeps a CLIP text model's weights without the ``text_model.`` prefix; 4.x has it
  (handled where the keys are read: ``families.py`` and ``hosts/ldm_convert.py``).
- diffusers before 0.3x's ``f_min``/``f_max`` (0.31 is what Forge pins and what install.py may pick
  beside transformers 4.30) has a linear schedule without them: :func:`scheduler_function` gives the
  same schedule with them.
- Pillow 9 (AUTOMATIC1111 pins 9.5.0) opens a 16-bit grayscale PNG as mode ``I``, Pillow 10+ as
  ``I;16``: :func:`is_16bit_gray` recognises both, so it is scaled to 8 bits rather than clipped.
- Optional packages: LoHa needs lycoris-lora; some optimizers need a minimum release of their
  package (:data:`OPTIONAL_PACKAGES`, :func:`package_problem`). The advice printed for a missing
  package is TrainTrain's own install.py (:func:`install_command`), which installs it without
  moving any package the web UI has; a bare ``pip install`` can upgrade setuptools, numpy or torch
  under a web UI.

Only the standard library is imported at module level.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTALL_SCRIPT = ROOT / "install.py"


@dataclass(frozen=True)
class OptionalPackage:
    """A package a feature needs: its import name, its pip name and the lowest release that works."""

    module: str
    dist: str
    minimum: str | None = None
    feature: str = ""

    @property
    def spec(self) -> str:
        return f"{self.dist}>={self.minimum}" if self.minimum else self.dist


# The lowest release each optional feature works with (checked against the releases themselves:
# dadaptation 2.0, what pip's --prefer-binary picks, has no DAdaptLion and no use_bias_correction).
LYCORIS = OptionalPackage("lycoris", "lycoris-lora", "3.0", "LoHa networks (network_type loha)")
DADAPTATION = OptionalPackage("dadaptation", "dadaptation", "2.0", "the D-Adaptation optimizers")
DADAPTATION_LION = OptionalPackage("dadaptation", "dadaptation", "3.0", "DadaptLion")


def _version_key(text: str) -> tuple:
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:4])


def version_below(version: str, minimum: str) -> bool:
    """True when ``version`` is older than ``minimum``."""
    try:
        from packaging.version import Version

        return Version(version) < Version(minimum)
    except Exception:  # packaging missing, or a version it cannot parse
        return _version_key(version) < _version_key(minimum)


def installed_version(dist: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def install_command(spec: str) -> str:
    """A command that installs ``spec`` without changing any package the web UI already has.

    In a checkout (the web-UI extension folder) this is TrainTrain's install.py run with this
    Python; a bare ``pip install`` could upgrade packages the web UI pins. Elsewhere (TrainTrain
    installed as a package in its own environment) plain pip is fine.
    """
    name = re.split(r"[<>=!~ ;\[]", spec, maxsplit=1)[0]
    if INSTALL_SCRIPT.is_file():
        return f"{_quote(sys.executable)} {_quote(str(INSTALL_SCRIPT))} {name}"
    return f"{_quote(sys.executable)} -m pip install \"{spec}\""


def _quote(text: str) -> str:
    return f'"{text}"' if sys.platform == "win32" else shlex.quote(text)


def package_problem(package: OptionalPackage) -> str | None:
    """Why ``package`` cannot be used here (missing, or older than its minimum), or None when it can."""
    if importlib.util.find_spec(package.module) is None:
        return (f"{package.feature} need(s) the Python package '{package.dist}', which is not installed; "
                f"install it with: {install_command(package.spec)}")
    version = installed_version(package.dist)
    if package.minimum and version is not None and version_below(version, package.minimum):
        return (f"{package.feature} need(s) {package.dist} >= {package.minimum}, but {version} is installed; "
                f"install a newer one with: {install_command(package.spec)}")
    return None


def scheduler_function(name: str, func):
    """diffusers' schedule function ``func`` for ``name``, or an equivalent that takes the settings newer
    diffusers releases take (``linear``: ``f_min``, ``f_max``) when this release's lacks them."""
    import inspect

    if name == "linear" and "f_min" not in inspect.signature(func).parameters:
        return linear_schedule_with_warmup
    return func


def linear_schedule_with_warmup(optimizer, num_warmup_steps: int, num_training_steps: int, last_epoch: int = -1,
                                f_min: float = 0.0, f_max: float = 1.0):
    """Warm up linearly from 0 to ``f_max`` x lr, then decay linearly to ``f_min`` x lr at the last step."""
    from torch.optim.lr_scheduler import LambdaLR

    def factor(step: int) -> float:
        if step < num_warmup_steps:
            return f_max * step / max(1, num_warmup_steps)
        left = (num_training_steps - step) / max(1, num_training_steps - num_warmup_steps)
        return f_min + (f_max - f_min) * max(0.0, left)

    return LambdaLR(optimizer, factor, last_epoch)


def is_16bit_gray(image) -> bool:
    """True for a 16-bit grayscale image as Pillow opened it (call before any transpose: a copy has no format)."""
    return image.mode.startswith("I;16") or (image.mode == "I" and getattr(image, "format", None) == "PNG")


class MissingPackageError(ImportError):
    """An optional package a chosen feature needs is missing or too old; the message says how to install it."""


def require(package: OptionalPackage) -> None:
    """Raise :class:`MissingPackageError` when ``package`` cannot be used here."""
    problem = package_problem(package)
    if problem:
        raise MissingPackageError(problem)


def network_type_problem(network_type: str) -> str | None:
    """Why ``network_type`` cannot be trained here (a missing package), or None."""
    return package_problem(LYCORIS) if network_type == "loha" else None



def import_diffusers_without_bitsandbytes() -> bool:
    """Import diffusers' model classes without importing bitsandbytes; for a process the trainer owns.

    diffusers imports bitsandbytes (for loading bitsandbytes-quantised models) and peft, which
    diffusers imports, does too; together about 2 s of CPU at every start and a "kernels" warning
    on the console, for something training never uses. While diffusers loads, bitsandbytes is
    marked unimportable and diffusers is told it is absent; afterwards the mark is gone, so a
    chosen 8-bit optimizer still imports it. Only the CLI and the standalone page call this: in a
    web UI diffusers belongs to the host, and this changes nothing there. Returns whether it acted
    (not when diffusers is already imported or bitsandbytes is not installed).
    """
    if "diffusers" in sys.modules or "bitsandbytes" in sys.modules or \
            importlib.util.find_spec("bitsandbytes") is None:
        return False
    sys.modules["bitsandbytes"] = None  # `import bitsandbytes` raises ImportError meanwhile
    try:
        import diffusers.utils.import_utils as diffusers_imports

        diffusers_imports._bitsandbytes_available = False
        from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401  (what the run imports anyway)
    finally:
        if sys.modules.get("bitsandbytes", 0) is None:
            del sys.modules["bitsandbytes"]
    return True


def quiet_library_output():
    """For a run in a process the trainer owns (CLI): transformers' and diffusers' own progress bars
    ("Loading weights") and their info and warning lines stay off the console; the trainer says what
    it loads and what went wrong. Errors still show. A web UI's libraries are the host's: not called
    there. Returns a function that puts both libraries' settings back as they were."""
    undo = []
    for name in ("transformers", "diffusers"):
        try:
            module = __import__(f"{name}.utils.logging", fromlist=["logging"])
        except ImportError:  # pragma: no cover - both are required packages
            continue
        level, bars = module.get_verbosity(), module.is_progress_bar_enabled()
        module.set_verbosity_error()
        module.disable_progress_bar()
        undo.append((module, level, bars))

    def restore() -> None:
        for module, level, bars in undo:
            module.set_verbosity(level)
            if bars:
                module.enable_progress_bar()

    return restore


def import_quietly(module: str):
    """``importlib.import_module(module)`` with the package's own import-time log warnings held back
    (bitsandbytes warns about an optional 'kernels' package on every CPU import)."""
    import importlib
    import logging

    top = logging.getLogger(module.split(".")[0])
    level = top.level
    top.setLevel(logging.ERROR)
    try:
        return importlib.import_module(module)
    finally:
        top.setLevel(level)
