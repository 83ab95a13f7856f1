"""TrainTrain's entry point for AUTOMATIC1111 / Forge: registers the "TrainTrain" tab, nothing else.

The web UI imports every ``scripts/*.py`` of an extension at start-up. This file only makes
the ``trainer`` package importable from the extension folder and registers a tab callback;
torch, diffusers and gradio are imported when the host builds the tab, not here.
"""

import sys
from pathlib import Path

EXTENSION_ROOT = str(Path(__file__).resolve().parent.parent)


def _put_extension_on_path() -> None:
    # The host puts the extension folder on sys.path only while it imports this file (some
    # versions), so the folder is added here and again when the tab is built.
    if EXTENSION_ROOT not in sys.path:
        sys.path.insert(0, EXTENSION_ROOT)


_put_extension_on_path()

import trainer  # noqa: E402  (binds the package to this folder now; it imports nothing heavy)

if str(Path(trainer.__file__).resolve().parent.parent) != EXTENSION_ROOT:
    raise ImportError(f"another package named 'trainer' ({trainer.__file__}) was imported before TrainTrain's "
                      f"({EXTENSION_ROOT}); remove or rename that package for the TrainTrain tab to load")

from trainer.hosts.webui import register_tab  # noqa: E402


def build_tab():
    """The tab's gr.Blocks, built by trainer.ui.page for this web UI."""
    _put_extension_on_path()
    from trainer.hosts.webui_session import WebUIHost
    from trainer.ui.page import build_ui

    return build_ui(WebUIHost(), standalone=False)


register_tab(build_tab)
