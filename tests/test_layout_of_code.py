"""The package's import graph keeps the layers that docs/DESIGN.md describes.

Read with ``ast`` (nothing is imported): every ``import trainer...`` of every module, also the
ones inside functions and under ``TYPE_CHECKING``, so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "trainer"
# Top-level modules: each does one thing; everything else lives in a package.
TOP_LEVEL = {"__init__", "__main__", "atomic", "bundle", "compat", "conditioning", "families", "heap", "paths",
             "plot"}
CONSOLE_MODULES = ("trainer.cli", "trainer.__main__")  # the only code that talks to a terminal


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _target(name: str) -> str:
    """The module an imported name lives in: ``trainer.training.job.run_job`` -> ``trainer.training.job``."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == "trainer"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "trainer":
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return {_target(n) for n in names} - {"trainer"}


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def _within(module: str, packages) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_hosts_do_not_import_the_job_layer_the_ui_or_the_cli():
    wrong = {m: sorted(d for d in deps if _within(d, ("trainer.training", "trainer.cli", "trainer.ui")))
             for m, deps in GRAPH.items() if _within(m, ("trainer.hosts",))}
    assert {m: d for m, d in wrong.items() if d} == {}


# What each package must not import (docs/DESIGN.md says what each owns and may import).
LAYERS = {
    "trainer.network": ("trainer.config", "trainer.modes", "trainer.hosts", "trainer.training", "trainer.ui",
                        "trainer.cli", "trainer.data"),
    "trainer.data": ("trainer.config", "trainer.modes", "trainer.hosts", "trainer.training", "trainer.ui",
                     "trainer.cli", "trainer.network"),
    "trainer.modes": ("trainer.hosts", "trainer.ui", "trainer.cli", "trainer.training.job", "trainer.training.loop",
                      "trainer.training.queue", "trainer.training.preflight"),
    "trainer.config": ("trainer.hosts", "trainer.ui", "trainer.cli", "trainer.training.job",
                       "trainer.training.loop", "trainer.training.queue", "trainer.training.preflight"),
    "trainer.training": ("trainer.ui", "trainer.cli"),
    "trainer.ui": ("trainer.cli",),
}


# The exact enumeration strings (modes, network types, optimizers...): a leaf any package may read.
LEAVES = ("trainer.config.choices",)


def test_packages_import_only_the_layers_below_them():
    wrong = {m: sorted(d for d in deps if _within(d, LAYERS[package]) and d not in LEAVES)
             for package in LAYERS for m, deps in GRAPH.items() if _within(m, (package,))}
    assert {m: d for m, d in wrong.items() if d} == {}


def test_only_the_cli_imports_the_cli():
    wrong = {m: sorted(d for d in deps if _within(d, ("trainer.cli",)))
             for m, deps in GRAPH.items() if not _within(m, CONSOLE_MODULES)}
    assert {m: d for m, d in wrong.items() if d} == {}


def _console_uses(path: Path) -> list[str]:
    uses = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
            uses.append(f"print() at line {node.lineno}")
        elif (isinstance(node, ast.Attribute) and node.attr == "exit" and isinstance(node.value, ast.Name)
              and node.value.id == "sys"):
            uses.append(f"sys.exit at line {node.lineno}")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            uses += [f"import {n} at line {node.lineno}" for n in names if n and n.split(".")[0] in ("tqdm", "signal")]
    return uses


def test_domain_code_has_no_console_concerns():
    """print, exit codes, SIGINT and progress bars belong to trainer/cli/."""
    found = {m: _console_uses(p) for m, p in MODULES.items() if not _within(m, CONSOLE_MODULES)}
    assert {m: u for m, u in found.items() if u} == {}


def test_the_checks_see_what_they_look_for(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import sys\nfrom tqdm import tqdm\ndef f():\n    print('x')\n    sys.exit(2)\n")
    assert _console_uses(sample) == ["import tqdm at line 2", "print() at line 4", "sys.exit at line 5"]
    sample.write_text("from trainer.training.job import run_job\nif False:\n    import trainer.cli.train\n")
    assert _imports(sample) == {"trainer.training.job", "trainer.cli.train"}


def test_top_level_holds_only_single_purpose_modules():
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top == TOP_LEVEL, "put new code in a package (cli, config, training, ui, hosts, network, data, modes)"


_IMPORT_EACH = """
import importlib, sys
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "trainer" or m.startswith("trainer.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as error:
        failed.append(f"{name}: {type(error).__name__}: {error}")
print("\\n".join(failed))
"""


def test_every_module_imports_on_its_own():
    """Importing any one module first works: a cycle through a package's ``__init__`` (which the
    graph above cannot see, Python imports it implicitly) fails here."""
    import subprocess
    import sys

    names = sorted(n for n in MODULES if n != "trainer.__main__")
    run = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *names], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == ""
