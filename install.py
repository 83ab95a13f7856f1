"""Install what TrainTrain needs and the web UI lacks; never change a package the web UI already has.

AUTOMATIC1111 and Forge run ``python extensions/<name>/install.py`` at start-up, with the web
UI's Python, the web-UI folder as the working directory and ``PYTHONPATH`` pointing at it.

Rules:

- A package that is present is left alone, whatever its version. If it is older than TrainTrain
  needs, one line names it (nothing is changed).
- A missing package is installed by pip with every installed distribution pinned as a
  constraint (``name==installed version`` in a temporary ``-c`` file), so pip cannot upgrade or
  downgrade torch, numpy, gradio, protobuf, pillow, transformers or anything else to satisfy
  the new package: it picks a release of the new package that fits, or fails and says so.
  The optimizer packages are optional; bitsandbytes, pytorch_optimizer, schedulefree and
  lion-pytorch depend on torch (and numpy), which the constraints keep as installed.
- When nothing is missing, nothing runs and nothing is printed (at most the one line above).
  A package pip could not fit is remembered (``.install-state.json`` next to this file, with a
  digest of the installed distributions) and not tried again until the environment changes, so
  a later start does not download again to fail again; it prints one line instead.

What the packages pull in, as resolved by pip against an AUTOMATIC1111-like set of pins
(torch 2.1.2, numpy 1.26.4, huggingface_hub 0.20.3, transformers 4.30.2): bitsandbytes needs
torch (recent releases torch >= 2.4, so pip takes 0.45.x), pytorch_optimizer torch >= 2.1 and
numpy, schedulefree torch and typing-extensions, lion-pytorch torch; prodigyopt and dadaptation
declare nothing. pandas 3.1 needs numpy >= 2 (pip takes 3.0.x), lycoris-lora adds einops and
toml, matplotlib its plotting helpers. diffusers >= 0.31 needs a newer huggingface_hub than
0.20, so there it is reported as not installable rather than moving huggingface_hub.

The web UI's ``launch.is_installed`` / ``launch.run_pip`` are used when ``launch`` is importable
(``run_pip`` honours ``--skip-install``); otherwise ``importlib.metadata`` and ``python -m pip``.

Environment variables: ``TRAINTRAIN_SKIP_INSTALL=1`` skips everything;
``TRAINTRAIN_INSTALL_ONLY=tqdm,pandas`` limits the run to those of the packages below.
Only the standard library is used here (this runs before anything else is installed);
``packaging`` is used for version comparison when the web UI has it.
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


@dataclass(frozen=True)
class Need:
    """A distribution TrainTrain uses: its pip name, the lowest version it works with, optional or not."""

    name: str
    minimum: str | None = None
    optional: bool = False

    @property
    def spec(self) -> str:
        return f"{self.name}>={self.minimum}" if self.minimum else self.name


NEEDS = (
    Need("diffusers", "0.31"), Need("transformers", "4.40"), Need("accelerate", "0.30"),
    Need("safetensors", "0.4"), Need("lycoris-lora", "3.0"), Need("pandas"), Need("matplotlib"), Need("tqdm"),
    Need("bitsandbytes", "0.43", optional=True), Need("pytorch_optimizer", "3.0", optional=True),
    Need("prodigyopt", optional=True), Need("schedulefree", optional=True), Need("dadaptation", optional=True),
    Need("lion-pytorch", optional=True),
)

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


@dataclass
class Plan:
    """What one run does: packages to install, present ones that are too old, the pins for pip."""

    install: list[Need] = field(default_factory=list)
    too_old: list[tuple[Need, str]] = field(default_factory=list)
    constraints: list[str] = field(default_factory=list)


def make_plan(needs: Iterable[Need], installed: Mapping[str, str],
              is_installed: Callable[[str], bool] | None = None) -> Plan:
    """Decide what to install: only missing needs; every installed distribution pinned as it is."""
    plan = Plan()
    installed = {normalise(name): version for name, version in installed.items()}
    for need in needs:
        version = installed.get(normalise(need.name))
        present = version is not None or (is_installed is not None and is_installed(need.name))
        if not present:
            plan.install.append(need)
        elif version is not None and need.minimum and version_below(version, need.minimum):
            plan.too_old.append((need, version))
    plan.constraints = [f"{name}=={version}" for name, version in sorted(installed.items())
                        if _PEP440.match(version)]
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


def _launch():
    """The web UI's ``launch`` module when it offers ``is_installed`` and ``run_pip``, else None."""
    try:
        import launch
    except Exception:  # not inside a web UI, or its launch module failed to import
        return None
    return launch if hasattr(launch, "run_pip") and hasattr(launch, "is_installed") else None


def _pip_install(need: Need, constraints_file: str, launch) -> str | None:
    """Install one package; None when it worked, else pip's reason in one line."""
    if launch is not None:
        try:
            launch.run_pip(f'install "{need.spec}" -c "{constraints_file}"', f"{need.name} for TrainTrain")
            return None
        except Exception as error:  # run_pip raises RuntimeError with pip's output
            return pip_reason(str(error))
    done = subprocess.run([sys.executable, "-m", "pip", "install", need.spec, "-c", constraints_file,
                           "--prefer-binary"], capture_output=True, text=True)
    return None if done.returncode == 0 else pip_reason(done.stdout + "\n" + done.stderr)


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


def _install(needs: list[Need], constraints: list[str], launch, out: Callable[[str], None]) -> list[Need]:
    """pip-install each need under the constraints; returns the ones that failed."""
    failed = []
    handle, constraints_file = tempfile.mkstemp(prefix="traintrain-constraints-", suffix=".txt")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write("\n".join(constraints) + "\n")
        for need in needs:
            reason = _pip_install(need, constraints_file, launch)
            importlib.invalidate_caches()
            if reason is None and normalise(need.name) not in installed_distributions():
                reason = "pip did not install it; the web UI may run with --skip-install"
            if reason is None:
                out(f"TrainTrain: installed {need.spec}")
                continue
            failed.append(need)
            what = "optional package" if need.optional else "package"
            out(f"TrainTrain: could not install the {what} {need.spec} without changing packages the web UI "
                f"has ({reason}); install a fitting version by hand if you need it")
    finally:
        os.remove(constraints_file)
    return failed


def main(needs: Iterable[Need] | None = None, out: Callable[[str], None] = print) -> int:
    """Run the installation; returns 0, or 1 while a required package is missing."""
    if os.environ.get("TRAINTRAIN_SKIP_INSTALL", "").strip() not in ("", "0"):
        return 0
    try:
        chosen = select(NEEDS if needs is None else needs, os.environ.get("TRAINTRAIN_INSTALL_ONLY"))
    except ValueError as error:
        out(f"TrainTrain: {error}")
        return 1
    launch = _launch()
    before = installed_distributions()
    plan = make_plan(chosen, before, launch.is_installed if launch is not None else None)
    memory = state_path()
    known = _remembered_failures(memory, before)
    skipped = [n for n in plan.install if n.spec in known]
    notes = []
    if plan.too_old:
        notes.append("left as the web UI has them, older than TrainTrain needs: "
                     + ", ".join(f"{n.name} {v} (needs >={n.minimum})" for n, v in plan.too_old))
    if skipped:
        notes.append(f"not installed, pip could not fit them to the web UI's packages: "
                     f"{', '.join(n.spec for n in skipped)} (delete {memory} to try again)")
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
    sys.exit(main())
