import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
REFERENCE_PRESETS = SHARED / "fixtures" / "reference-presets"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Two torch threads on a 2-core machine that also runs other work oversubscribe badly."""
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture
def reference_presets_dir() -> Path:
    if not REFERENCE_PRESETS.is_dir():
        pytest.skip(f"reference presets not found at {REFERENCE_PRESETS}")
    return REFERENCE_PRESETS


@pytest.fixture(scope="session")
def tiny_world(request, tmp_path_factory):
    """The tiny text-to-image world of tests/tinyworld.py, trained once and kept in the pytest
    cache (.pytest_cache/d/tinyworld-<hash of its settings and training code>) across runs."""
    import tinyworld

    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    name = f"tinyworld-{tinyworld.world_key()}"
    folder = cache.mkdir(name) if cache is not None else tmp_path_factory.mktemp(name)
    return tinyworld.load_or_train(folder)
