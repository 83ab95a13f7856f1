"""install.py: installs only what is missing and never moves a package the web UI already has.

The planning is tested in-process; the real pip path runs in a fresh venv (no system site
packages) that holds pinned "host" distributions (torch, gradio, numpy, protobuf, pillow as
metadata-only stand-ins, plus a real tiny local package), with pip limited to local wheels.
"""

from __future__ import annotations

import base64
import hashlib
import json
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

def test_only_missing_packages_are_installed_and_only_protected_ones_and_host_pins_are_pinned(tmp_path):
    installed = {"torch": "2.13.0+cu121", "numpy": "1.26.2", "gradio": "3.41.2", "transformers": "4.30.2",
                 "safetensors": "0.4.2", "tqdm": "4.66.1", "protobuf": "3.20.0", "clip": "1.0",
                 "setuptools": "69.5.1", "accelerate": "0.21.0", "weird": "1.0-custom build", "lark": "1.1.9"}
    (tmp_path / "requirements_versions.txt").write_text(
        "setuptools==69.5.1  # temp fix\nlark==1.1.2\nomegaconf==2.2.3\n# comment==1\ntorch\n"
        "https://example.invalid/pydantic-1.10.15-py3-none-any.whl\n")
    plan = make_plan(NEEDS, installed, pins=install.host_pins(tmp_path))
    names = [n.name for n in plan.install]
    assert "transformers" not in names and "safetensors" not in names and "tqdm" not in names
    assert names[:2] == ["diffusers", "lycoris-lora"] and "bitsandbytes" in names
    assert plan.too_old == []  # the web UIs' transformers 4.30 / accelerate 0.21 are supported
    assert plan.constraints == ["accelerate==0.21.0", "gradio==3.41.2", "lark==1.1.9", "numpy==1.26.2",
                                "omegaconf==2.2.3", "protobuf==3.20.0", "safetensors==0.4.2", "setuptools==69.5.1",
                                "torch==2.13.0+cu121", "transformers==4.30.2"]


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


def test_only_what_training_cannot_do_without_is_required():
    required = {n.name for n in NEEDS if not n.optional}
    assert required == {"diffusers", "transformers", "accelerate", "safetensors", "tqdm"}
    assert all(n.feature for n in NEEDS if n.optional)


def test_dadaptation_asks_for_a_release_with_every_optimizer():
    """--prefer-binary alone takes the 2.0 wheel, which lacks DAdaptLion; 3.x is source-only."""
    from trainer.compat import DADAPTATION_LION

    (need,) = [n for n in NEEDS if n.name == "dadaptation"]
    assert need.spec == f"dadaptation>={DADAPTATION_LION.minimum}"


def test_diffusers_candidates_follow_the_installed_transformers():
    assert install.diffusers_candidates("4.30.2") == ("diffusers>=0.31,<0.32",)
    assert install.diffusers_candidates("4.48.1") == ("diffusers>=0.31,<0.37", "diffusers>=0.31,<0.32")
    assert install.diffusers_candidates("4.57.0")[0] == "diffusers>=0.31"
    assert install.diffusers_candidates(None)[0] == "diffusers>=0.31"


def _imports_in(tree) -> set[tuple[str, str]]:
    import ast

    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in (
                "diffusers", "transformers", "accelerate"):
            found |= {(node.module, alias.name) for alias in node.names}
    return found


def test_the_import_check_covers_everything_the_trainer_imports_from_diffusers_transformers_accelerate():
    import ast

    used = set()
    for path in (ROOT / "trainer").rglob("*.py"):
        used |= _imports_in(ast.parse(path.read_text(encoding="utf-8")))
    checked = _imports_in(ast.parse(install.TRAINER_IMPORTS))
    assert used and used <= checked, sorted(used - checked)


# ----------------------------------------------------------------------------- main(), in-process

class _FakePip:
    """A launch module whose run_pip acts like pip on a made-up index: ``--dry-run --report`` writes
    the report of the release it would take, ``install`` installs it. ``broken_resolve`` models an
    inconsistent environment: pip cannot resolve anything that depends on torch unless --no-deps."""

    def __init__(self, installed, index):
        self.installed, self.index = installed, index
        self.commands, self.pins_seen, self.fail, self.broken_resolve = [], [], False, False
        self.is_installed = lambda name: install.normalise(name) in self.installed

    def _pick(self, spec):
        from packaging.requirements import Requirement

        req = Requirement(spec)
        for version, requires, wheel in self.index[install.normalise(req.name)]:  # newest first
            if req.specifier.contains(version, prereleases=True):
                return install.normalise(req.name), version, requires
        raise RuntimeError(f"ERROR: No matching distribution found for {spec}")

    def run_pip(self, command, desc=None, live=False):
        import shlex

        self.commands.append(command)
        args = shlex.split(command) + ["--prefer-binary"]  # what the web UI's run_pip adds
        constraints = args[args.index("-c") + 1]
        self.pins_seen.append(Path(constraints).read_text().split())
        spec = args[1 if args[1] != "--dry-run" else args.index("--report") + 2]
        if self.fail:
            raise RuntimeError(f"Couldn't install {desc}.\n" + PIP_CONFLICT)
        name, version, requires = self._pick(spec)
        if "--dry-run" in args:
            Path(args[args.index("--report") + 1]).write_text(json.dumps(
                {"install": [{"metadata": {"name": name, "version": version, "requires_dist": requires}}]}))
            return
        if "--no-deps" not in args:
            if self.broken_resolve and any(r.startswith("torch") for r in requires):
                raise RuntimeError(f"Couldn't install {desc}.\n" + PIP_TORCH_CONFLICT)
            for requirement in requires:
                if install.normalise(requirement.split(">")[0].split("=")[0]) not in self.installed:
                    self.run_pip(f"install {requirement} -c {constraints}")
        self.installed[name] = version


PIP_TORCH_CONFLICT = """ERROR: Cannot install torch because these package versions have conflicting dependencies.

The conflict is caused by:
    torch 2.13.0 depends on setuptools>=77.0.3
    The user requested (constraint) setuptools==69.5.1
"""

INDEX = {
    "tqdm": [("4.67.1", [], True)],
    "lycoris-lora": [("4.1.3", ["torch", "einops", "toml", "numpy"], True)],
    "einops": [("0.8.2", [], True)],
    "toml": [("0.10.2", [], True)],
    "dadaptation": [("3.2", [], False), ("2.0", [], True)],
    "diffusers": [("0.37.1", ["huggingface-hub>=0.34", "numpy"], True), ("0.36.0", ["huggingface-hub>=0.34", "numpy"], True),
                  ("0.31.0", ["huggingface-hub>=0.23.2", "numpy"], True)],
    "schedulefree": [("1.4.1", ["torch"], True)],
}


@pytest.fixture
def fake_env(monkeypatch, tmp_path):
    """install.main() against a made-up environment and a launch module that acts like pip."""
    pip = _FakePip({"torch": "2.13.0", "numpy": "1.26.2", "setuptools": "69.5.1"}, INDEX)
    launch = types.ModuleType("launch")
    launch.is_installed, launch.run_pip = pip.is_installed, pip.run_pip
    monkeypatch.setitem(sys.modules, "launch", launch)
    monkeypatch.setattr(install, "installed_distributions", lambda: dict(pip.installed))
    monkeypatch.setattr(install, "trainer_imports_work", lambda: None)
    monkeypatch.delenv("TRAINTRAIN_INSTALL_ONLY", raising=False)
    monkeypatch.delenv("TRAINTRAIN_SKIP_INSTALL", raising=False)
    monkeypatch.setenv("TRAINTRAIN_INSTALL_STATE", str(tmp_path / "install-state.json"))
    monkeypatch.chdir(tmp_path)
    return pip


def test_main_installs_missing_through_launch_with_pins_then_does_nothing(fake_env):
    lines = []
    assert install.main([Need("tqdm"), Need("numpy", "1.20")], out=lines.append) == 0
    assert [c.split(" -c ")[0] for c in fake_env.commands] == [
        f"install --dry-run --quiet --no-deps --ignore-installed --report {c.split('--report ')[1].split()[0]} tqdm"
        for c in fake_env.commands[:1]] + ["install tqdm==4.67.1 --no-deps"]
    assert fake_env.pins_seen[-1] == ["numpy==1.26.2", "setuptools==69.5.1", "torch==2.13.0"]
    assert not Path(fake_env.commands[0].split(" -c ")[1]).exists()  # temporary file removed
    assert lines == ["TrainTrain: installed tqdm 4.67.1"]
    again = []
    assert install.main([Need("tqdm"), Need("numpy", "1.20")], out=again.append) == 0
    assert again == [] and len(fake_env.commands) == 2


def test_inconsistent_environment_still_gets_lycoris_through_no_deps(fake_env):
    """torch wants a newer setuptools than the web UI pins: pip resolves nothing that depends on torch."""
    fake_env.broken_resolve = True
    lines = []
    assert install.main([Need("lycoris-lora", "3.0", optional=True, feature="LoHa networks")], out=lines.append) == 0
    assert fake_env.installed["lycoris-lora"] == "4.1.3"
    assert fake_env.installed["einops"] == "0.8.2" and fake_env.installed["toml"] == "0.10.2"
    assert fake_env.installed["setuptools"] == "69.5.1" and fake_env.installed["torch"] == "2.13.0"
    assert [c.split(" -c ")[0] for c in fake_env.commands if "--dry-run" not in c] == [
        'install "lycoris-lora>=3.0"', "install einops==0.8.2 --no-deps", "install toml==0.10.2 --no-deps",
        "install lycoris-lora==4.1.3 --no-deps"]
    assert lines == ["TrainTrain: installed lycoris-lora 4.1.3"]


def test_a_missing_optional_package_is_one_line_with_safe_advice_and_exit_0(fake_env):
    fake_env.fail = True
    lines = []
    assert install.main([Need("schedulefree", optional=True, feature="the ScheduleFree optimizers")],
                        out=lines.append) == 0
    assert len(lines) == 1 and "the ScheduleFree optimizers will not be available" in lines[0]
    assert "pip install" not in lines[0] and lines[0].endswith(f"{Path(install.__file__).resolve()} schedulefree")


def test_dadaptation_comes_from_its_source_release_despite_prefer_binary(fake_env):
    assert install.main([n for n in NEEDS if n.name == "dadaptation"], out=lambda line: None) == 0
    assert fake_env.installed["dadaptation"] == "3.2"


def test_diffusers_that_does_not_import_is_replaced_by_an_older_release(fake_env, monkeypatch):
    fake_env.installed.update({"transformers": "4.57.0", "huggingface-hub": "0.36.2"})
    removed = []

    def imports():
        return None if fake_env.installed["diffusers"] == "0.36.0" else "ImportError: cannot import name 'X'"

    monkeypatch.setattr(install, "trainer_imports_work", imports)
    monkeypatch.setattr(install.Pip, "uninstall", staticmethod(lambda name: removed.append(name)
                                                               or fake_env.installed.pop(name) and None))
    lines = []
    assert install.main([Need("diffusers", "0.31")], out=lines.append) == 0
    assert fake_env.installed["diffusers"] == "0.36.0" and removed == ["diffusers"]
    assert lines == ["TrainTrain: diffusers 0.37.1 does not work beside the installed packages (ImportError: cannot "
                     "import name 'X'); removing it and trying an older release", "TrainTrain: installed diffusers 0.36.0"]
    assert all("diffusers==" not in pin for pins in fake_env.pins_seen for pin in pins)


def test_too_old_packages_are_named_in_one_line_and_left_alone(fake_env):
    lines = []
    install.main([Need("numpy", "2.0"), Need("torch", "2.14")], out=lines.append)
    assert lines == ["TrainTrain: left as the web UI has them, older than TrainTrain needs: "
                     "numpy 1.26.2 (needs >=2.0), torch 2.13.0 (needs >=2.14)"]
    assert fake_env.commands == []


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
    fake_env.fail = True
    lines = []
    assert install.main([Need("schedulefree", optional=True, feature="x")], out=lines.append) == 0
    assert len(lines) == 1 and REASON in lines[0]
    assert install.main([Need("tqdm")], out=lines.append) == 1  # a required one fails the run
    calls = len(fake_env.commands)
    again = []
    assert install.main([Need("tqdm"), Need("schedulefree", optional=True)], out=again.append) == 1
    assert len(fake_env.commands) == calls and len(again) == 1
    assert again[0].startswith("TrainTrain: not installed, pip could not fit them to the web UI's packages: "
                               "tqdm, schedulefree (to try again: ")
    assert again[0].endswith("install.py tqdm schedulefree)")
    fake_env.installed["huggingface-hub"] = "0.36.0"  # the environment changed: try again
    install.main([Need("tqdm")], out=again.append)
    assert len(fake_env.commands) > calls


def test_naming_packages_on_the_command_line_limits_the_run_and_retries(fake_env):
    fake_env.fail = True
    install.main([Need("tqdm")], out=lambda line: None)
    calls = len(fake_env.commands)
    fake_env.fail = False
    assert install.main([Need("tqdm"), Need("schedulefree")], out=lambda line: None, names=["tqdm"]) == 0
    assert len(fake_env.commands) > calls and "schedulefree" not in fake_env.installed


def test_skip_install_does_nothing(fake_env, monkeypatch):
    monkeypatch.setenv("TRAINTRAIN_SKIP_INSTALL", "1")
    assert install.main([Need("tqdm")], out=print) == 0 and fake_env.commands == []


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


def _metadata_only(site: Path, name: str, version: str, requires: tuple = ()) -> None:
    """An installed distribution as pip and importlib.metadata see it (no code: a stand-in)."""
    info = site / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                   + "".join(f"Requires-Dist: {r}\n" for r in requires))
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
        # The environment is inconsistent, as web UIs' often are (torch 2.13 asks setuptools >= 77.0.3
        # where the web UI pins 69.5.1): no setuptools there is satisfies this torch.
        _metadata_only(site, name, version, requires=("setuptools>=900",) if name == "torch" else ())
    for version in ("1.0", "2.0"):
        _wheel(wheels, "probe-dep", version)
        _wheel(wheels, "probe-pkg", version, requires=(f"probe-dep>={version}",))
    _wheel(wheels, "lycoris-lora", "4.1.3", requires=("torch", "numpy", "probe-extra"))
    _wheel(wheels, "probe-extra", "1.0")
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
    (webui_root / "requirements_versions.txt").write_text("probe-dep==1.0\ngradio==3.41.2\ntorch\n")
    return types.SimpleNamespace(python=python, env=env, root=webui_root)


def _install_py(venv, *, launch: bool, only: str = "tqdm") -> subprocess.CompletedProcess:
    """Run install.py as the web UI does: its python, cwd = web-UI root, PYTHONPATH = that root."""
    env = dict(venv.env, TRAINTRAIN_INSTALL_ONLY=only,
               PYTHONPATH=str(FAKEHOST) if launch else str(venv.root))  # FAKEHOST holds a launch.py
    return subprocess.run([str(venv.python), str(ROOT / "install.py")], env=env, cwd=venv.root,
                          capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_real_pip_installs_the_missing_package_and_moves_no_pin(venv):
    pins = dict(HOST_PINS, **{"probe-dep": "1.0"})
    first = _install_py(venv, launch=True)
    assert first.returncode == 0, first.stderr + first.stdout
    assert first.stdout.splitlines() == ["Installing tqdm for TrainTrain (checking what it needs)",
                                         "Installing tqdm for TrainTrain", "TrainTrain: installed tqdm 4.70.1"]
    after = _versions(venv.python)
    assert "tqdm" in after and all(after[name] == version for name, version in pins.items())
    second = _install_py(venv, launch=False)
    assert second.returncode == 0 and second.stdout.strip() == "" and _versions(venv.python) == after


@pytest.mark.slow
def test_real_pip_picks_a_release_that_fits_the_pins(venv):
    """probe-pkg 2.0 needs probe-dep 2.0; with probe-dep 1.0 pinned by the web UI's requirements_versions.txt
    pip must take probe-pkg 1.0."""
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


@pytest.mark.slow
def test_real_pip_installs_a_torch_dependent_package_into_an_inconsistent_environment(venv):
    """pip cannot resolve anything that needs this torch (its setuptools requirement is unmet and
    setuptools is pinned), so lycoris-lora and its missing requirement go in with --no-deps."""
    before = _versions(venv.python)
    run = _install_py(venv, launch=True, only="lycoris-lora")
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.splitlines()[-1] == "TrainTrain: installed lycoris-lora 4.1.3"
    after = _versions(venv.python)
    assert after["lycoris-lora"] == "4.1.3" and after["probe-extra"] == "1.0"
    assert {k: v for k, v in after.items() if k not in ("lycoris-lora", "probe-extra")} == before
