"""The check after a save: the file loads in diffusers (LoHa: LyCORIS) with every key on a layer,
and a file with keys that fit no layer is reported with those keys."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import TinyHost, image_folder, quick_config
from network_helpers import randomize
from tiny import tiny_bundle
from trainer.network.io import save_network
from trainer.network.network import NetworkSpec, create_network
from trainer.training.control import TrainControl
from trainer.training.job import run_job
from trainer.training.loadcheck import check_file

pytest.importorskip("peft")


def _spec(network_type: str) -> NetworkSpec:
    return NetworkSpec(rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, train_text_encoder=True,
                       network_type=network_type)


@pytest.fixture(scope="module")
def bundles():
    return {kind: tiny_bundle(kind) for kind in ("sd1", "sdxl")}


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
@pytest.mark.parametrize("network_type", ["lierla", "c3lier", "loha"])
def test_every_module_of_a_saved_file_loads_with_no_key_unmatched(bundles, tmp_path, kind, network_type):
    if network_type == "loha":
        pytest.importorskip("lycoris")
    bundle = bundles[kind]
    net = create_network(bundle, _spec(network_type))
    randomize(net)
    path = save_network(net, tmp_path / "n.safetensors", metadata={}, dtype=torch.float32)
    before = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    check = check_file(path, bundle)
    assert check.loader == ("LyCORIS" if network_type == "loha" else "diffusers")
    assert (check.error, check.unmatched) == ("", [])
    assert check.modules == check.file_modules == len(net.all_modules)
    assert check.ok and check.summary().endswith(f"loaded: {len(net.all_modules)} modules, 0 keys unmatched")
    after = bundle.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)  # untouched


def _corrupt(path, out, rename):
    tensors = load_file(str(path))
    save_file({rename(k): v for k, v in tensors.items()}, str(out))
    return out


@pytest.mark.parametrize("network_type", ["lierla", "loha"])
def test_a_file_with_keys_for_no_layer_is_reported_with_those_keys(bundles, tmp_path, network_type):
    if network_type == "loha":
        pytest.importorskip("lycoris")
    bundle = bundles["sd1"]
    net = create_network(bundle, _spec(network_type))
    path = save_network(net, tmp_path / "n.safetensors", metadata={}, dtype=torch.float32)
    bad = _corrupt(path, tmp_path / "bad.safetensors",
                   lambda k: k.replace("attn1_to_q", "attn1_to_zz") if "down_blocks_0_attentions_0" in k else k)
    check = check_file(bad, bundle)
    assert not check.ok
    assert check.unmatched and all("to_zz" in k or "to.zz" in k for k in check.unmatched)
    assert "WARNING" in check.summary() and ("to_zz" in check.summary() or "to.zz" in check.summary())


def test_a_run_checks_its_file_and_says_so(tmp_path):
    data = image_folder(tmp_path / "data", n=2)
    lines = []
    cfg = quick_config(lora_data_directory=str(data), train_iterations="1", save_lora_name="checked")
    result = run_job(cfg, host=TinyHost("sd1", tmp_path / "out"), control=TrainControl(on_log=lines.append),
                     logs_dir=tmp_path / "logs")
    [check] = result.load_checks
    assert check.ok and check.file == result.saved[-1]
    assert any(line.startswith("load check of checked.safetensors (diffusers): loaded: ") for line in lines)


def test_without_a_peft_backend_the_check_is_skipped_naming_what_is_too_old(bundles, tmp_path, monkeypatch):
    """AUTOMATIC1111 1.8 pins transformers 4.30.2, below the 4.34 diffusers wants for its PEFT
    backend (with peft installed): the check says so instead of "peft is not installed"."""
    import importlib.metadata

    import diffusers.utils
    from diffusers.utils import constants

    net = create_network(bundles["sd1"], _spec("lierla"))
    path = save_network(net, tmp_path / "n.safetensors", metadata={}, dtype=torch.float32)
    real = importlib.metadata.version
    monkeypatch.setattr(diffusers.utils, "USE_PEFT_BACKEND", False)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "4.30.2" if name == "transformers" else real(name))
    check = check_file(path, bundles["sd1"])
    assert check.skipped == ("diffusers loads LoRAs only through its PEFT backend, and here transformers is "
                             f"4.30.2, below the {constants.MIN_TRANSFORMERS_VERSION} it needs")
