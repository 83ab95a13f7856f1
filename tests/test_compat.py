"""trainer.compat: the trainer behaves the same on the oldest packages the web UIs pin."""

from __future__ import annotations

import inspect

import pytest
import torch

from trainer.training.optim.optimizers import build_optimizer
from trainer.training.optim.schedulers import build_scheduler

LR, N, WARMUP = 1e-3, 20, 4


def _lrs(settings):
    info = build_optimizer("AdamW", torch.nn.Linear(2, 2).parameters(), lr=LR, device="cpu")
    sched = build_scheduler("linear", info, num_training_steps=N, warmup_steps=WARMUP, settings=settings)
    out = []
    for _ in range(N):
        out.append(info.optimizer.param_groups[0]["lr"])
        info.optimizer.step()
        sched.step()
    return out + [info.optimizer.param_groups[0]["lr"]]


def test_linear_schedule_takes_f_min_and_f_max_on_a_diffusers_without_them(monkeypatch):
    """diffusers 0.31 (Forge's pin, and what install.py may pick beside transformers 4.30) has no f_min."""
    from diffusers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    settings = {"f_min": 0.5, "f_max": 0.8}
    current = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType.LINEAR]
    expected = _lrs(settings) if "f_min" in inspect.signature(current).parameters else None

    def old_linear(optimizer, num_warmup_steps, num_training_steps, last_epoch=-1):
        raise AssertionError("not used: it lacks f_min")

    monkeypatch.setitem(TYPE_TO_SCHEDULER_FUNCTION, SchedulerType.LINEAR, old_linear)
    lrs = _lrs(settings)
    assert lrs[0] == 0 and lrs[WARMUP] == pytest.approx(0.8 * LR) and lrs[N] == pytest.approx(0.5 * LR)
    assert all(a >= b - 1e-12 for a, b in zip(lrs[WARMUP:], lrs[WARMUP + 1:]))  # decays monotonically
    if expected is not None:  # the same schedule as the diffusers that has them
        assert lrs == pytest.approx(expected)
