"""Step-speed switches: losses read at log intervals, multi-tensor optimizer steps, channels-last,
pinned transfer and the opt-in torch.compile with its fallback (trainer/training/speed.py)."""

from __future__ import annotations

import csv
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file

from helpers import TinyHost, image_folder, quick_config
from trainer.training import loop, speed
from trainer.training.control import TrainControl
from trainer.training.job import run_job


@dataclass
class _ScriptedTask:
    """A task whose loss is a scripted value times a trainable scale (1.0 at the start)."""

    config: object
    losses: list
    name: str = "main"
    epoch: int | None = None
    save_final: bool = False
    skip_training: bool = False

    def __post_init__(self):
        self.network = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.ones_(self.network.weight)

    def param_groups(self):
        return [{"params": list(self.network.parameters())}]

    def compute_loss(self, step):
        return self.network.weight.sum() * 0 + torch.tensor(self.losses[step])

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def metadata(self):
        return {}


def _loop_options(tmp_path, events, **extra):
    from trainer.training.runlog import CsvLog

    csv_log = CsvLog(tmp_path / "loss.csv", {}, 1)
    control = TrainControl(on_progress=events.append)
    return loop.LoopOptions(save=lambda *a: tmp_path / "x", stem="x", device=torch.device("cpu"),
                            control=control, csv=csv_log, **extra), csv_log


def test_losses_are_read_back_only_at_log_intervals_and_every_step_keeps_its_row(tmp_path):
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    task = _ScriptedTask(quick_config(train_iterations=str(len(values)), train_optimizer="SGDNesterov"), values)
    events = []
    opts, csv_log = _loop_options(tmp_path, events, log_every=3)
    result = loop.run(task, opts)
    csv_log.close()
    steps = [e for e in events if not e.message]
    seen = {e.step: e.loss for e in steps}
    # steps 1-2 are reported before any loss was read; 3 reads 1-3; 4-5 carry 3's; 6 reads; 7 is the last
    assert all(seen[s] != seen[s] for s in (1, 2))  # NaN: nothing read yet
    assert seen[3] == 3.0 and seen[4] == 3.0 and seen[5] == 3.0 and seen[6] == 6.0 and seen[7] == 7.0
    rows = list(csv.reader(open(tmp_path / "loss.csv", encoding="utf-8")))
    head = next(i for i, r in enumerate(rows) if r and r[0] == "Step")
    assert [float(r[2]) for r in rows[head + 1:]] == values  # one row per step, each its own loss
    assert result.last_loss == 7.0


def test_a_loss_that_is_not_finite_stops_the_run_naming_its_step(tmp_path):
    values = [1.0, float("nan"), 1.0, 1.0]
    task = _ScriptedTask(quick_config(train_iterations="4", train_optimizer="SGDNesterov"), values)
    opts, csv_log = _loop_options(tmp_path, [], log_every=4)
    with pytest.raises(FloatingPointError, match="at step 2;"):
        loop.run(task, opts)
    csv_log.close()


def test_torch_optimizers_take_their_multi_tensor_step():
    from trainer.training.optim.optimizers import build_optimizer

    params = [torch.nn.Parameter(torch.zeros(3))]
    adamw = build_optimizer("AdamW", params, lr=1e-3, device="cpu")
    assert adamw.step_kind == "foreach" and adamw.optimizer.defaults["foreach"] is True
    own = build_optimizer("AdamW", params, lr=1e-3, device="cpu", settings="foreach=False")
    assert own.step_kind == "as set" and own.optimizer.defaults["foreach"] is False
    # on a CUDA device with CUDA parameters the fused kernel is asked for (decided without a GPU here)
    from trainer.training.optim.optimizers import _multi_tensor_step

    class _Cuda(torch.Tensor):
        is_cuda = True

    kwargs = {}
    cuda_param = torch.zeros(2).as_subclass(_Cuda)
    assert _multi_tensor_step(torch.optim.AdamW, {"fused", "foreach"}, kwargs, [{"params": [cuda_param]}],
                              torch.device("cuda")) == "fused" and kwargs == {"fused": True}


def test_channels_last_and_pinned_transfer_are_cuda_only_and_say_so():
    from trainer.modes.base import to_device

    conv = torch.nn.Conv2d(4, 4, 3)
    text = speed.channels_last(conv, torch.device("cpu"))
    assert "not used on cpu" in text and conv.weight.is_contiguous()
    assert "not used" in speed.channels_last(conv, torch.device("cpu"), transformer=True)
    assert "plain copies" in speed.pinned_transfer(torch.device("cpu"))
    x = torch.ones(2, 3)
    assert to_device(x, torch.device("cpu")) is x


def _weights(path):
    return load_file(str(path))


@pytest.mark.slow
def test_compile_unet_falls_back_to_the_uncompiled_model_with_the_reason(tmp_path, monkeypatch):
    data = image_folder(tmp_path / "data", n=2)
    common = dict(lora_data_directory=str(data), train_iterations="3", save_overwrite=True)
    plain = run_job(quick_config(save_lora_name="plain", **common), host=TinyHost("sd1", tmp_path / "o"),
                    logs_dir=tmp_path / "logs")

    def broken_compile(fn, *args, **kwargs):
        def compiled(*a, **k):
            raise RuntimeError("forced: no C++ compiler for inductor")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")  # restored afterwards; the run sets its own
    messages = []
    host = TinyHost("sd1", tmp_path / "o")
    result = run_job(quick_config(save_lora_name="compiled", compile_unet=True, **common), host=host,
                     logs_dir=tmp_path / "logs", control=TrainControl(on_log=messages.append))
    assert any("torch.compile of the UNet2DConditionModel" in m and str(tmp_path / "logs" / "compile") in m
               for m in messages)
    failed = [m for m in messages if "torch.compile failed" in m]
    assert len(failed) == 1 and "RuntimeError: forced: no C++ compiler" in failed[0] and "uncompiled" in failed[0]
    assert "forward" not in vars(host.bundle.unet)  # the run put the model's own forward back
    a, b = _weights(plain.saved[-1]), _weights(result.saved[-1])
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_compile_unet_runs_the_steps_through_the_compiled_forward(tmp_path, monkeypatch):
    data = image_folder(tmp_path / "data", n=2)
    calls = []

    def counting_compile(fn, *args, **kwargs):
        def compiled(*a, **k):
            calls.append(1)
            return fn(*a, **k)
        return compiled

    monkeypatch.setattr(torch, "compile", counting_compile)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "own-cache"))  # the user's folder wins
    messages = []
    run_job(quick_config(lora_data_directory=str(data), train_iterations="3", compile_unet=True),
            host=TinyHost("sd1", tmp_path / "o"), logs_dir=tmp_path / "logs",
            control=TrainControl(on_log=messages.append))
    assert len(calls) == 3  # one U-Net call per step, all compiled
    assert any(str(tmp_path / "own-cache") in m for m in messages)
    assert not any("failed" in m for m in messages)
