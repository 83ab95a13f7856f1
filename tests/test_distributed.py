"""Two processes under `accelerate launch` give the network one process gives for the same
total batch (CPU, gloo)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import image_folder, quick_config
from tiny import save_tiny_diffusers

ROOT = Path(__file__).resolve().parent.parent


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    model = save_tiny_diffusers("sd1", tmp_path / "model")
    data = image_folder(tmp_path / "data", n=4)
    cfg = quick_config(lora_data_directory=str(data), train_iterations="4", train_batch_size="2",
                       model=str(model), save_lora_name="dp", train_lr_scheduler="cosine")
    cfg_path = tmp_path / "run.json"
    cfg.to_json(cfg_path)
    common = ["-m", "trainer", "train", str(cfg_path), "--device", "cpu"]
    one = subprocess.run([sys.executable, *common, "--output-dir", str(tmp_path / "one"),
                          "--logs-dir", str(tmp_path / "logs1")],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    two = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
                          *common, "--output-dir", str(tmp_path / "two"), "--logs-dir", str(tmp_path / "logs2")],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "dp.safetensors"))
    b = load_file(str(tmp_path / "two" / "dp.safetensors"))
    assert a.keys() == b.keys()
    moved = 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-3, msg=k)
        moved += int(k.endswith("lora_up.weight") and a[k].abs().max() > 0)
    assert moved > 0  # the runs trained something


def test_each_process_keeps_its_share_of_the_batch():
    from trainer.conditioning import Conditioning
    from trainer.training.distributed import Dist

    x = torch.arange(8).view(4, 2)
    first, second = Dist(rank=0, world=2), Dist(rank=1, world=2)
    assert first.shard(x).tolist() == [[0, 1], [2, 3]]
    assert second.shard(x).tolist() == [[4, 5], [6, 7]]
    cond = second.shard(Conditioning(torch.zeros(4, 77, 8), torch.ones(4, 16)))
    assert cond.hidden.shape == (2, 77, 8) and cond.pooled.shape == (2, 16)
    assert Dist().shard(x) is x
    import pytest

    with pytest.raises(ValueError, match="multiple of the number of processes"):
        first.check_batch(3)
