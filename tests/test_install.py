"""install.py: installs only what is missing and never moves a package the web UI already has.

The planning is tested in-process; the real pip path runs in a fresh venv (no system site
packages) that holds pinned "host" distributions (torch, gradio, numpy, protobuf, pillow as
metadata-only stand-ins, plus a real tiny local package), with pip limited to local wheels.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest

import install
from install import NEEDS, Need, make_plan, select

ROOT = Path(__file__).resolve().parent.parent
FAKEHOST = Path(__file__).resolve().parent / "fakehost"
HOST_PINS = {"torch": "2.1.2+cu121", "gradio": "3.41.2", "numpy": "1.26.4", "protobuf": "3.20.0", "pillow": "9.5.0"}
LOCAL_TQDM = Path("/opt/pypi/files/tqdm-4.70.1-py3-none-any.whl")


# ----------------------------------------------------------------------------- planning

def test_only_missing_packages_are_installed_and_everything_installed_is_pinned():
    installed = {"torch": "2.1.2+cu121", "numpy": "1.26.4", "gradio": "3.41.2", "transformers": "4.30.2",
                 "safetensors": "0.4.2", "tqdm": "4.66.1", "protobuf": "3.20.0", "clip": "1.0",
                 "weird": "1.0-custom build"}
    plan = make_plan(NEEDS, installed)
    names = [n.name for n in plan.install]
    assert "transformers" not in names and "safetensors" not in names and "tqdm" not in names
    assert names[:3] == ["diffusers", "accelerate", "lycoris-lora"] and "bitsandbytes" in names
    assert [n.spec for n in plan.install][0] == "diffusers>=0.31"
    assert [(n.name, v) for n, v in plan.too_old] == [("transformers", "4.30.2")]
    for pin in ("torch==2.1.2+cu121", "numpy==1.26.4", "gradio==3.41.2", "transformers==4.30.2",
                "protobuf==3.20.0", "clip==1.0"):
        assert pin in plan.constraints
    assert not any(c.startswith(("weird", "diffusers")) for c in plan.constraints)


def test_names_match_whatever_their_spelling_and_launch_can_vouch_for_a_package():
    plan = make_plan([Need("lycoris-lora", "3.0"), Need("pytorch_optimizer"), Need("lion-pytorch")],
                     {"lycoris_lora": "3.1.0", "pytorch-optimizer": "3.0.0"},
                     is_installed=lambda name: name == "lion-pytorch")
    assert plan.install == [] and plan.too_old == []


def test_install_only_limits_the_run_and_rejects_unknown_names():
    assert [n.name for n in select(NEEDS, "tqdm, Lion_Pytorch")] == ["tqdm", "lion-pytorch"]
    assert select(NEEDS, "") == list(NEEDS)
    with pytest.raises(ValueError, match="TRAINTRAIN_INSTALL_ONLY names torch, .*choose from: diffusers"):
        select(NEEDS, "tqdm,torch")


# ----------------------------------------------------------------------------- main(), in-process

@pytest.fixture
def fake_env(monkeypatch, tmp_path):
    """install.main() against a made-up environment and a launch module that records run_pip."""
    state = {"installed": {"torch": "2.1.2", "numpy": "1.26.4"}, "commands": [], "pins_seen": []}
    launch = types.ModuleType("launch")
    launch.is_installed = lambda name: install.normalise(name) in state["installed"]

    def run_pip(command, desc=None, live=False):
        state["commands"].append(command)
        constraints = command.split(" -c ")[1].strip('"')
        state["pins_seen"].append(Path(constraints).read_text().split())
        if "fail" in state:
            raise RuntimeError(f"Couldn't install {desc}.\n" + PIP_CONFLICT)
        state["installed"][install.normalise(command.split('"')[1].split(">=")[0])] = "9.9"

    launch.run_pip = run_pip
    monkeypatch.setitem(sys.modules, "launch", launch)
    monkeypatch.setattr(install, "installed_distributions", lambda: dict(state["installed"]))
    monkeypatch.delenv("TRAINTRAIN_INSTALL_ONLY", raising=False)
    monkeypatch.delenv("TRAINTRAIN_SKIP_INSTALL", raising=False)
    monkeypatch.setenv("TRAINTRAIN_INSTALL_STATE", str(tmp_path / "install-state.json"))
    return state


def test_main_installs_missing_through_launch_with_pins_then_does_nothing(fake_env):
    lines = []
    assert install.main([Need("tqdm"), Need("numpy", "1.20")], out=lines.append) == 0
    assert fake_env["commands"] == [fake_env["commands"][0]] and fake_env["commands"][0].startswith('install "tqdm" -c "')
    assert fake_env["pins_seen"] == [["numpy==1.26.4", "torch==2.1.2"]]
    assert not Path(fake_env["commands"][0].split(" -c ")[1].strip('"')).exists()  # temporary file removed
    assert lines == ["TrainTrain: installed tqdm"]
    again = []
    assert install.main([Need("tqdm"), Need("numpy", "1.20")], out=again.append) == 0
    assert again == [] and len(fake_env["commands"]) == 1


def test_too_old_packages_are_named_in_one_line_and_left_alone(fake_env):
    lines = []
    install.main([Need("numpy", "2.0"), Need("torch", "2.4")], out=lines.append)
    assert lines == ["TrainTrain: left as the web UI has them, older than TrainTrain needs: "
                     "numpy 1.26.4 (needs >=2.0), torch 2.1.2 (needs >=2.4)"]
    assert fake_env["commands"] == []


PIP_CONFLICT = """ERROR: Cannot install diffusers==0.41.0 and diffusers==0.42.1 because these package versions have \
conflicting dependencies.

The conflict is caused by:
    diffusers 0.42.1 depends on huggingface-hub<3.0 and >=1.32.0
    diffusers 0.41.0 depends on huggingface-hub<2.0 and >=1.32.0
    The user requested (constraint) huggingface-hub==0.20.3

To fix this you could try to:
1. loosen the range of package versions you've specified

ERROR: ResolutionImpossible: for help visit https://pip.pypa.io/en/latest/topics/dependency-resolution/
"""
REASON = ("diffusers 0.42.1 depends on huggingface-hub<3.0 and >=1.32.0; diffusers 0.41.0 depends on "
          "huggingface-hub<2.0 and >=1.32.0; The user requested (constraint) huggingface-hub==0.20.3")


def test_pip_reason_keeps_the_conflict_lines():
    assert install.pip_reason(PIP_CONFLICT) == REASON
    assert install.pip_reason("Collecting x\nERROR: No matching distribution found for x\n") == \
        "ERROR: No matching distribution found for x"


def test_a_failed_install_is_reported_once_and_not_retried_until_the_environment_changes(fake_env):
    fake_env["fail"] = True
    lines = []
    assert install.main([Need("schedulefree", optional=True)], out=lines.append) == 0
    assert lines == [f"TrainTrain: could not install the optional package schedulefree without changing packages "
                     f"the web UI has ({REASON}); install a fitting version by hand if you need it"]
    assert install.main([Need("diffusers", "0.31")], out=lines.append) == 1  # a required one fails the run
    calls = len(fake_env["commands"])
    again = []
    assert install.main([Need("diffusers", "0.31"), Need("schedulefree", optional=True)], out=again.append) == 1
    assert len(fake_env["commands"]) == calls and len(again) == 1
    assert again[0].startswith("TrainTrain: not installed, pip could not fit them to the web UI's packages: "
                               "diffusers>=0.31, schedulefree (delete ")
    fake_env["installed"]["huggingface-hub"] = "0.36.0"  # the environment changed: try again
    install.main([Need("diffusers", "0.31")], out=again.append)
    assert len(fake_env["commands"]) == calls + 1


def test_skip_install_does_nothing(fake_env, monkeypatch):
    monkeypatch.setenv("TRAINTRAIN_SKIP_INSTALL", "1")
    assert install.main([Need("tqdm")], out=print) == 0 and fake_env["commands"] == []


# ----------------------------------------------------------------------------- real pip in a venv

def _wheel(folder: Path, name: str, version: str, requires: tuple = ()) -> Path:
    """A minimal pure-python wheel."""
    module = name.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": f"__version__ = {version!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                            + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: traintrain-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join(record + [f"{info}/RECORD,,"]) + "\n"
    target = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(target, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return target


def _metadata_only(site: Path, name: str, version: str) -> None:
    """An installed distribution as pip and importlib.metadata see it (no code: a stand-in)."""
    info = site / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text(f"{info.name}/METADATA,,\n{info.name}/INSTALLER,,\n{info.name}/RECORD,,\n")


def _versions(python: Path) -> dict:
    code = ("import importlib.metadata as m, json; "
            "print(json.dumps({d.metadata['Name'].lower(): d.version for d in m.distributions()}))")
    import json

    return json.loads(subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True).stdout)


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A venv (no system site packages) with the host's pins and a local wheel folder for pip."""
    base = tmp_path_factory.mktemp("install_venv")
    env_dir, wheels = base / "venv", base / "wheels"
    wheels.mkdir()
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, capture_output=True)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    for name, version in HOST_PINS.items():
        _metadata_only(site, name, version)
    for version in ("1.0", "2.0"):
        _wheel(wheels, "probe-dep", version)
        _wheel(wheels, "probe-pkg", version, requires=(f"probe-dep>={version}",))
    env = dict(os.environ, PIP_CONFIG_FILE=os.devnull, PIP_FIND_LINKS=str(wheels), PIP_DISABLE_PIP_VERSION_CHECK="1",
               TRAINTRAIN_INSTALL_STATE=str(base / "install-state.json"))
    if LOCAL_TQDM.is_file():  # keep pip off the network where a copy of the wheel is at hand
        shutil.copy(LOCAL_TQDM, wheels)
        env["PIP_NO_INDEX"] = "1"
    env.pop("PYTHONPATH", None)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "probe-dep==1.0"], check=True, env=env,
                   capture_output=True)
    webui_root = base / "webui"
    webui_root.mkdir()
    return types.SimpleNamespace(python=python, env=env, root=webui_root)


def _install_py(venv, *, launch: bool, only: str = "tqdm") -> subprocess.CompletedProcess:
    """Run install.py as the web UI does: its python, cwd = web-UI root, PYTHONPATH = that root."""
    env = dict(venv.env, TRAINTRAIN_INSTALL_ONLY=only,
               PYTHONPATH=str(FAKEHOST) if launch else str(venv.root))  # FAKEHOST holds a launch.py
    return subprocess.run([str(venv.python), str(ROOT / "install.py")], env=env, cwd=venv.root,
                          capture_output=True, text=True, timeout=180)


def test_real_pip_installs_the_missing_package_and_moves_no_pin(venv):
    pins = dict(HOST_PINS, **{"probe-dep": "1.0"})
    first = _install_py(venv, launch=True)
    assert first.returncode == 0, first.stderr + first.stdout
    assert first.stdout.splitlines() == ["Installing tqdm for TrainTrain", "TrainTrain: installed tqdm"]  # via launch
    after = _versions(venv.python)
    assert "tqdm" in after and all(after[name] == version for name, version in pins.items())
    second = _install_py(venv, launch=False)
    assert second.returncode == 0 and second.stdout.strip() == "" and _versions(venv.python) == after


def test_real_pip_picks_a_release_that_fits_the_pins(venv):
    """probe-pkg 2.0 needs probe-dep 2.0; with probe-dep 1.0 pinned pip must take probe-pkg 1.0."""
    unconstrained = subprocess.run(
        [str(venv.python), "-m", "pip", "install", "--dry-run", "probe-pkg"], env=venv.env,
        capture_output=True, text=True)
    assert "probe-dep-2.0" in unconstrained.stdout.replace("probe_dep", "probe-dep")  # what pip alone would do
    driver = ("import sys; sys.path.insert(0, sys.argv[1]); import install; "
              "sys.exit(install.main([install.Need('probe-pkg')]))")
    run = subprocess.run([str(venv.python), "-c", driver, str(ROOT)], env=dict(venv.env, PYTHONPATH=""),
                         cwd=venv.root, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    versions = _versions(venv.python)
    assert versions["probe-pkg"] == "1.0" and versions["probe-dep"] == "1.0"
    assert all(versions[name] == version for name, version in HOST_PINS.items())
