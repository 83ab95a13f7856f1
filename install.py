"""Install what TrainTrain needs and the web UI lacks; never change a package the web UI already has.

AUTOMATIC1111 and Forge run ``python extensions/<name>/install.py`` at start-up, with the web
UI's Python, the web-UI folder as the working directory and ``PYTHONPATH`` pointing at it.
Run by hand, ``python install.py dadaptation lycoris-lora`` installs just those (same rules).

Rules:

- A package that is present is left alone, whatever its version. If it is older than TrainTrain
  needs, one line names it (nothing is changed).
- A missing package is installed by pip with the packages that must never move pinned as
  constraints (``name==installed version`` in a temporary ``-c`` file): torch, numpy, gradio,
  transformers, diffusers, huggingface_hub, accelerate, tokenizers, protobuf, pillow, safetensors,
  setuptools and everything the web UI pins in its ``requirements_versions.txt`` (read from the
  working directory). Only those: a web UI's environment is often already inconsistent (torch
  2.13 asks for setuptools >= 77 where the web UI pins 69.5.1), and pinning every installed
  distribution would leave pip unable to install anything that depends on torch.
- Before installing, pip is asked (``--dry-run --report``) which release it would take and what
  that release requires. When everything it requires is already installed, in fitting versions,
  it is installed with ``--no-deps``: pip then touches nothing else. When some requirement is
  missing and pip cannot resolve the environment as a whole, the missing ones are installed the
  same way first.
- diffusers is tried newest-first from a short list that depends on the installed transformers
  (:data:`DIFFUSERS_CANDIDATES`), and after each install a subprocess imports everything the
  trainer uses from diffusers, transformers and accelerate; a release that fails is uninstalled
  (only a package this run installed is ever removed) and the next one is tried.
- Only diffusers, transformers, accelerate, safetensors and tqdm are required. The others are
  optional: LoHa needs lycoris-lora, the loss plots pandas and matplotlib, some optimizers their
  packages. A missing optional package is a one-line note and the run still exits 0; the note
  gives the command that installs it safely (this script, not a bare ``pip install``, which could
  upgrade setuptools, numpy or torch under the web UI).
- dadaptation needs 3.0 or newer (DadaptLion); those releases are source-only, and the web UI's
  ``run_pip`` passes ``--prefer-binary``, which without the minimum takes the 2.0 wheel.
- When nothing is missing, nothing runs and nothing is printed (at most the one line above).
  A package pip could not fit is remembered (``.install-state.json`` next to this file, with a
  digest of the installed distributions) and not tried again until the environment changes, so
  a later start does not download again to fail again; it prints one line instead. Naming it on
  the command line tries again.

The web UI's ``launch.is_installed`` / ``launch.run_pip`` are used when ``launch`` is importable
(``run_pip`` honours ``--skip-install`` and adds ``--prefer-binary``); otherwise
``importlib.metadata`` and ``python -m pip ... --prefer-binary``.

Environment variables: ``TRAINTRAIN_SKIP_INSTALL=1`` skips everything;
``TRAINTRAIN_INSTALL_ONLY=tqdm,pandas`` limits the run to those of the packages below (as do
names given on the command line). Only the standard library is used here (this runs before
anything else is installed); ``packaging`` (or pip's copy of it) reads requirements and versions.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

# What the trainer imports from diffusers, transformers and accelerate: a release that cannot run
# this (in a fresh interpreter) is not kept. tests/test_install.py checks it covers trainer/.
TRAINER_IMPORTS = """\
import diffusers, transformers, accelerate
from diffusers import AutoencoderKL, UNet2DConditionModel, DDPMScheduler, EulerDiscreteScheduler
from diffusers.utils import USE_PEFT_BACKEND, constants
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.loaders.single_file_utils import (DIFFUSERS_TO_LDM_MAPPING, LDM_UNET_KEY, convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint, convert_open_clip_checkpoint)
from diffusers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTextConfig, CLIPTokenizer
from transformers.models.clip import modeling_clip
from transformers.models.t5 import modeling_t5
from transformers.optimization import AdafactorSchedule
from accelerate import init_empty_weights, Accelerator
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # the whole of diffusers imports
"""

# diffusers releases to try, newest first, by the installed transformers (lowest version of each row).
# diffusers declares no transformers requirement, so pip alone happily takes one that cannot import:
# 0.37 needs transformers' Dinov2WithRegistersConfig (transformers >= 4.49), and 0.32-0.36 import their
# models beside AUTOMATIC1111's transformers 4.30.2 but not their pipelines (SiglipImageProcessor,
# transformers >= 4.37); 0.31 imports whole there. huggingface_hub, pinned as installed, narrows it further.
DIFFUSERS_CANDIDATES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("4.49", ("diffusers>=0.31", "diffusers>=0.31,<0.37", "diffusers>=0.31,<0.32")),
    ("4.37", ("diffusers>=0.31,<0.37", "diffusers>=0.31,<0.32")),
    ("0", ("diffusers>=0.31,<0.32",)),
)


@dataclass(frozen=True)
class Need:
    """A distribution TrainTrain uses: its pip name, the lowest version it works with, optional or not."""

    name: str
    minimum: str | None = None
    optional: bool = False
    feature: str = ""  # what it is for, in the note when it is missing

    @property
    def spec(self) -> str:
        return f"{self.name}>={self.minimum}" if self.minimum else self.name


NEEDS = (
    Need("diffusers", "0.31"), Need("transformers", "4.30"), Need("accelerate", "0.21"),
    Need("safetensors", "0.3"), Need("tqdm"),
    Need("lycoris-lora", "3.0", optional=True, feature="LoHa networks"),
    Need("pandas", optional=True, feature="the loss plots"), Need("matplotlib", optional=True, feature="the loss plots"),
    Need("bitsandbytes", "0.43", optional=True, feature="the 8-bit and paged optimizers"),
    Need("pytorch_optimizer", "3.0", optional=True, feature="CAME, Tiger and AdamMini"),
    Need("prodigyopt", optional=True, feature="Prodigy"),
    Need("schedulefree", optional=True, feature="the ScheduleFree optimizers"),
    Need("dadaptation", "3.0", optional=True, feature="the D-Adaptation optimizers"),
    Need("lion-pytorch", optional=True, feature="Lion"),
)

# Packages that must never move under a web UI, whatever else happens (plus the UI's own pins).
PROTECTED = ("torch", "torchvision", "torchaudio", "xformers", "numpy", "gradio", "gradio-client", "transformers",
             "tokenizers", "diffusers", "huggingface-hub", "accelerate", "protobuf", "pillow", "safetensors",
             "setuptools")
HOST_REQUIREMENTS = "requirements_versions.txt"

# A canonical PEP 440 version (with an optional local label): only such versions are pinned.
_PEP440 = re.compile(
    r"^([1-9][0-9]*!)?(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*((a|b|rc)(0|[1-9][0-9]*))?"
    r"(\.post(0|[1-9][0-9]*))?(\.dev(0|[1-9][0-9]*))?(\+[a-zA-Z0-9]+(\.[a-zA-Z0-9]+)*)?$")


def normalise(name: str) -> str:
    """The comparable form of a distribution name (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_distributions() -> dict[str, str]:
    """normalised name -> version of every distribution this Python sees (the first on sys.path wins)."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] if dist.metadata else None
        if name and normalise(name) not in found:
            found[normalise(name)] = dist.version
    return found


def version_below(version: str, minimum: str) -> bool:
    """True when ``version`` is older than ``minimum`` (``packaging`` when present, else numeric parts)."""
    try:
        from packaging.version import Version

        return Version(version) < Version(minimum)
    except Exception:  # packaging missing, or a version it cannot parse
        def key(text: str) -> tuple:
            return tuple(int(p) for p in re.findall(r"\d+", text.split("+")[0])[:4])

        return key(version) < key(minimum)


def host_pins(folder: Path | None = None) -> dict[str, str]:
    """normalised name -> version of the ``name==version`` lines of the web UI's requirements_versions.txt."""
    try:
        text = ((folder or Path.cwd()) / HOST_REQUIREMENTS).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    pins = {}
    for line in text.splitlines():
        found = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)", line)
        if found:
            pins[normalise(found.group(1))] = found.group(2)
    return pins


@dataclass
class Plan:
    """What one run does: packages to install, present ones that are too old, the pins for pip."""

    install: list[Need] = field(default_factory=list)
    too_old: list[tuple[Need, str]] = field(default_factory=list)
    constraints: list[str] = field(default_factory=list)


def make_plan(needs: Iterable[Need], installed: Mapping[str, str],
              is_installed: Callable[[str], bool] | None = None, pins: Mapping[str, str] | None = None) -> Plan:
    """Decide what to install (only missing needs) and what to pin (the protected packages and the
    web UI's own pins: as installed, else as the web UI pins them)."""
    plan = Plan()
    installed = {normalise(name): version for name, version in installed.items()}
    for need in needs:
        version = installed.get(normalise(need.name))
        present = version is not None or (is_installed is not None and is_installed(need.name))
        if not present:
            plan.install.append(need)
        elif version is not None and need.minimum and version_below(version, need.minimum):
            plan.too_old.append((need, version))
    pins = {normalise(n): v for n, v in (pins or {}).items()}
    for name in sorted(set(PROTECTED) | set(pins)):
        version = installed.get(name) or pins.get(name)
        if version and _PEP440.match(version):
            plan.constraints.append(f"{name}=={version}")
    return plan


def select(needs: Iterable[Need], only: str | None) -> list[Need]:
    """``needs`` limited to the comma-separated names of ``only`` (None or blank: all)."""
    needs = list(needs)
    if not only or not only.strip():
        return needs
    wanted = {normalise(n.strip()) for n in only.split(",") if n.strip()}
    known = {normalise(n.name) for n in needs}
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(f"TRAINTRAIN_INSTALL_ONLY names {', '.join(unknown)}, which TrainTrain does not install; "
                         f"choose from: {', '.join(n.name for n in needs)}")
    return [n for n in needs if normalise(n.name) in wanted]


def diffusers_candidates(transformers_version: str | None) -> tuple[str, ...]:
    """The diffusers specs to try, newest first, beside this transformers (None: not installed yet)."""
    for lowest, specs in DIFFUSERS_CANDIDATES:
        if transformers_version is None or not version_below(transformers_version, lowest):
            return specs
    return DIFFUSERS_CANDIDATES[-1][1]


def _launch():
    """The web UI's ``launch`` module when it offers ``is_installed`` and ``run_pip``, else None."""
    try:
        import launch
    except Exception:  # not inside a web UI, or its launch module failed to import
        return None
    return launch if hasattr(launch, "run_pip") and hasattr(launch, "is_installed") else None


def pip_reason(output: str) -> str:
    """The informative part of pip's failure output: its conflict lines, else its last error line."""
    lines = [line.strip() for line in output.splitlines()]
    if "The conflict is caused by:" in lines:
        start = lines.index("The conflict is caused by:") + 1
        conflict = []
        for line in lines[start:]:
            if not line:
                break
            conflict.append(line)
        return "; ".join(conflict[:2] + conflict[-1:] if len(conflict) > 3 else conflict)
    errors = [line for line in lines if line.startswith("ERROR:")]
    rest = [line for line in lines if line and not line.startswith("WARNING:")]
    return (errors or rest or ["pip failed"])[-1]


def _packaging():
    """``packaging``'s Requirement class: the web UI's copy, else pip's; None without either."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        try:
            from pip._vendor.packaging.requirements import Requirement
        except ImportError:
            return None
    return Requirement


def unmet(requires: Iterable[str], installed: Mapping[str, str]) -> tuple[list[str], list[str]] | None:
    """(missing, conflicting) requirements of a release against what is installed; None when unreadable."""
    requirement = _packaging()
    if requirement is None:
        return None
    missing, conflicting = [], []
    for text in requires:
        try:
            req = requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
        except Exception:  # a requirement this packaging cannot read
            return None
        version = installed.get(normalise(req.name))
        if version is None:
            missing.append(f"{req.name}{req.specifier}")
        elif req.specifier and not req.specifier.contains(version, prereleases=True):
            conflicting.append(f"{req.name}{req.specifier} (installed: {version})")
    return missing, conflicting


class Pip:
    """pip through the web UI's ``run_pip`` (which adds ``--prefer-binary``), else ``python -m pip``."""

    def __init__(self, launch, constraints_file: str):
        self.launch = launch
        self.constraints = constraints_file

    def __call__(self, args: list[str], desc: str) -> str | None:
        """Run pip; None when it worked, else pip's reason in one line."""
        if self.launch is not None:
            try:
                self.launch.run_pip(" ".join(_quote(a) for a in args), desc)
                return None
            except Exception as error:  # run_pip raises RuntimeError with pip's output
                return pip_reason(str(error))
        done = subprocess.run([sys.executable, "-m", "pip", *args, "--prefer-binary"], capture_output=True, text=True)
        return None if done.returncode == 0 else pip_reason(done.stdout + "\n" + done.stderr)

    def install(self, spec: str, desc: str, no_deps: bool = False) -> str | None:
        return self([
            "install", spec, *(["--no-deps"] if no_deps else []), "-c", self.constraints], desc)

    @staticmethod
    def uninstall(name: str) -> str | None:
        """Remove a package this run installed (not through ``run_pip``: its ``--prefer-binary`` is no
        option of ``pip uninstall``)."""
        done = subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", name], capture_output=True, text=True)
        return None if done.returncode == 0 else pip_reason(done.stdout + "\n" + done.stderr)

    def release(self, spec: str, desc: str) -> tuple[str, str, list[str]] | None:
        """(name, version, requirements) of the release pip would install for ``spec``; None if unknown."""
        handle, report = tempfile.mkstemp(prefix="traintrain-pip-report-", suffix=".json")
        os.close(handle)
        try:
            if self(["install", "--dry-run", "--quiet", "--no-deps", "--ignore-installed", "--report", report,
                     spec, "-c", self.constraints], desc) is not None:
                return None
            data = json.loads(Path(report).read_text(encoding="utf-8") or "{}")
            meta = data["install"][0]["metadata"]
            return meta["name"], meta["version"], list(meta.get("requires_dist") or [])
        except (OSError, ValueError, KeyError, IndexError, TypeError):  # old pip, --skip-install, no report
            return None
        finally:
            os.remove(report)


def install_one(pip: Pip, spec: str, desc: str, depth: int = 0) -> str | None:
    """Install ``spec`` without moving anything installed; None when it worked, else the reason.

    When everything the chosen release requires is installed already, it goes in with ``--no-deps``.
    Otherwise pip resolves it under the constraints; when that fails only because the environment as a
    whole does not resolve, the missing requirements are installed one by one, then the release itself.
    """
    release = pip.release(spec, f"{desc} (checking what it needs)")
    gaps = unmet(release[2], installed_distributions()) if release else None
    if release and gaps == ([], []):
        return pip.install(f"{release[0]}=={release[1]}", desc, no_deps=True)
    reason = pip.install(spec, desc)
    if reason is None or gaps is None or gaps[1] or depth >= 3:
        return reason
    for dependency in gaps[0]:
        failed = install_one(pip, dependency, f"{dependency} for TrainTrain", depth + 1)
        if failed is not None:
            return f"{reason}; its requirement {dependency} did not install either: {failed}"
    importlib.invalidate_caches()
    if unmet(release[2], installed_distributions()) != ([], []):
        return reason
    return pip.install(f"{release[0]}=={release[1]}", desc, no_deps=True)


def trainer_imports_work() -> str | None:
    """None when a fresh interpreter imports what the trainer uses, else the last line of its error."""
    done = subprocess.run([sys.executable, "-c", TRAINER_IMPORTS], capture_output=True, text=True)
    if done.returncode == 0:
        return None
    lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"exit code {done.returncode}"


def _quote(text: str) -> str:
    return f'"{text}"' if re.search(r'[\s<>|&;"()]', text) or not text else text


def install_command(name: str) -> str:
    """The safe way to install ``name`` by hand: this script, with this Python."""
    return f"{_quote(sys.executable)} {_quote(str(Path(__file__).resolve()))} {name}"


def state_path() -> Path:
    """Where failed installs are remembered (TRAINTRAIN_INSTALL_STATE, else next to this file)."""
    configured = os.environ.get("TRAINTRAIN_INSTALL_STATE", "").strip()
    return Path(configured) if configured else Path(__file__).resolve().with_name(".install-state.json")


def fingerprint(installed: Mapping[str, str]) -> str:
    """A digest of the installed distributions: a remembered failure holds only while it is unchanged."""
    text = "\n".join(f"{name}=={version}" for name, version in sorted(installed.items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _remembered_failures(path: Path, installed: Mapping[str, str]) -> set[str]:
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    return set(saved.get("failed", [])) if saved.get("fingerprint") == fingerprint(installed) else set()


def _remember_failures(path: Path, installed: Mapping[str, str], failed: list[str]) -> None:
    try:
        if failed:
            path.write_text(json.dumps({"fingerprint": fingerprint(installed), "failed": failed}), encoding="utf-8")
        elif path.exists():
            path.unlink()
    except OSError:
        pass  # only an optimisation: without it the next start tries again


def _install_diffusers(pip: Pip, need: Need, out: Callable[[str], None]) -> str | None:
    """Try the diffusers candidates newest-first; keep the first one the trainer's imports work with."""
    reason = None
    for spec in diffusers_candidates(installed_distributions().get("transformers")):
        reason = install_one(pip, spec, f"{spec} for TrainTrain")
        importlib.invalidate_caches()
        if reason is None and "diffusers" not in installed_distributions():
            return "pip did not install it; the web UI may run with --skip-install"
        if reason is not None:
            continue
        broken = trainer_imports_work()
        if broken is None:
            return None
        version = installed_distributions().get("diffusers")
        out(f"TrainTrain: diffusers {version} does not work beside the installed packages ({broken}); "
            f"removing it and trying an older release")
        pip.uninstall("diffusers")
        importlib.invalidate_caches()
        reason = f"diffusers {version} installed but failed to import: {broken}"
    return reason


def _install(needs: list[Need], constraints: list[str], launch, out: Callable[[str], None]) -> list[Need]:
    """Install each need without moving the protected packages; returns the ones that failed."""
    failed = []
    handle, constraints_file = tempfile.mkstemp(prefix="traintrain-constraints-", suffix=".txt")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write("\n".join(constraints) + "\n")
        pip = Pip(launch, constraints_file)
        for need in needs:
            if normalise(need.name) == "diffusers":
                reason = _install_diffusers(pip, need, out)
            else:
                reason = install_one(pip, need.spec, f"{need.name} for TrainTrain")
            importlib.invalidate_caches()
            if reason is None and normalise(need.name) not in installed_distributions():
                reason = "pip did not install it; the web UI may run with --skip-install"
            if reason is None:
                out(f"TrainTrain: installed {need.name} {installed_distributions().get(normalise(need.name), '')}"
                    .rstrip())
                continue
            failed.append(need)
            out(_failure_line(need, reason))
    finally:
        os.remove(constraints_file)
    return failed


def _failure_line(need: Need, reason: str) -> str:
    if need.optional:
        return (f"TrainTrain: optional package {need.spec} not installed ({reason}); {need.feature} will not be "
                f"available. To try again without changing the web UI's packages: {install_command(need.name)}")
    return (f"TrainTrain: could not install {need.spec} without changing packages the web UI has ({reason}). "
            f"Training needs it. To try again: {install_command(need.name)}")


def main(needs: Iterable[Need] | None = None, out: Callable[[str], None] = print,
         names: list[str] | None = None) -> int:
    """Run the installation; returns 0, or 1 while a required package is missing after trying."""
    if os.environ.get("TRAINTRAIN_SKIP_INSTALL", "").strip() not in ("", "0"):
        return 0
    only = ",".join(names) if names else os.environ.get("TRAINTRAIN_INSTALL_ONLY")
    try:
        chosen = select(NEEDS if needs is None else needs, only)
    except ValueError as error:
        out(f"TrainTrain: {error}")
        return 1
    launch = _launch()
    before = installed_distributions()
    plan = make_plan(chosen, before, launch.is_installed if launch is not None else None, host_pins())
    memory = state_path()
    known = set() if names else _remembered_failures(memory, before)
    skipped = [n for n in plan.install if n.spec in known]
    notes = []
    if plan.too_old:
        notes.append("left as the web UI has them, older than TrainTrain needs: "
                     + ", ".join(f"{n.name} {v} (needs >={n.minimum})" for n, v in plan.too_old))
    if skipped:
        notes.append(f"not installed, pip could not fit them to the web UI's packages: "
                     f"{', '.join(n.spec for n in skipped)} (to try again: "
                     f"{install_command(' '.join(n.name for n in skipped))})")
    if notes:
        out("TrainTrain: " + "; ".join(notes))
    todo = [n for n in plan.install if n.spec not in known]
    failed = _install(todo, plan.constraints, launch, out) if todo else []
    if todo:
        after = installed_distributions()
        moved = _changed(before, after)
        if moved:
            out(f"TrainTrain: warning: pip changed {', '.join(moved)}")
        # Earlier failures stay valid only while nothing was installed (the environment is unchanged).
        still = known if fingerprint(after) == fingerprint(before) else set()
        _remember_failures(memory, after, sorted(still | {n.spec for n in failed}))
    return 1 if any(not n.optional for n in failed + skipped) else 0


def _changed(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    return [f"{name} {version} -> {after.get(name, 'removed')}" for name, version in sorted(before.items())
            if after.get(name) != version]


if __name__ == "__main__":
    sys.exit(main(names=sys.argv[1:] or None))
