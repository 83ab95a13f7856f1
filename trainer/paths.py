"""Folders of the extension: presets/, jsons/, logs/ next to the package, output/ for the CLI.

When the package runs from its checkout (web-UI extension or ``pip install -e``), logs and
user presets live in the extension folder as the reference keeps them; an installed copy
without those folders uses the current directory instead.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _folder(name: str) -> Path:
    here = ROOT / name
    return here if here.is_dir() else Path.cwd() / name


def logs_dir() -> Path:
    return _folder("logs")


def jsons_dir() -> Path:
    return _folder("jsons")


def presets_dir() -> Path:
    return _folder("presets")
