import gc
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


def pytest_collection_finish(session):
    """Everything imported and collected so far lives to the end: take it out of the garbage
    collector's sight (gc.freeze), so that a full collection (the trainer calls one after each run
    frees its VAE, and Python starts them as objects pile up) walks only what the tests made, not
    torch's, diffusers' and gradio's half a million module-level objects (0.26 s a time here)."""
    gc.collect()
    gc.freeze()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """The same after each test file, once its module fixtures are gone: what its tests imported
    lazily (peft, the LoRA loaders) stays frozen for the files after it; its garbage is freed first."""
    if nextitem is None or getattr(nextitem, "module", None) is not getattr(item, "module", None):
        gc.collect()
        gc.freeze()


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
