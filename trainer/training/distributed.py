"""Data-parallel training through accelerate (``accelerate launch --multi_gpu --num_processes N``).

Every process builds the same data order, noise and timesteps for the *whole* batch from the
same seed, then keeps its own slice of the batch (``shard``) before the UNet runs. The step's
forward runs inside accelerate's DistributedDataParallel wrapper of the network, so the
network's gradients are averaged across processes in backward; the result equals a single
process training on the whole batch. Only the main process logs, saves and writes state.

In a single process (the web-UI, a plain CLI run) nothing here touches accelerate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch


class _StepModule(torch.nn.Module):
    """Holds the network so DDP sees its parameters; ``forward(fn)`` runs one step's forward."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        return fn()


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    accelerator: object = None
    _wrapped: dict = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def check_batch(self, batch_size: int) -> None:
        if self.enabled and batch_size % self.world:
            raise ValueError(f"train_batch_size {batch_size} must be a multiple of the number of "
                             f"processes ({self.world}): each process trains an equal share of every batch")

    def shard(self, x):
        """This process's slice (along the batch) of a full-batch tensor or Conditioning."""
        if not self.enabled or x is None:
            return x
        if hasattr(x, "hidden"):  # Conditioning
            from trainer.conditioning import Conditioning

            return Conditioning(self.shard(x.hidden), self.shard(x.pooled), self.shard(x.mask))
        n = x.shape[0] // self.world
        return x[self.rank * n:(self.rank + 1) * n]

    def run(self, network: torch.nn.Module, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run a step's forward so that backward synchronises the network's gradients."""
        if not self.enabled:
            return fn()
        key = id(network)
        if key not in self._wrapped:
            self._wrapped[key] = self.accelerator.prepare(_StepModule(network))
        return self._wrapped[key](fn)

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(t, reduction="mean").item())

    def mean_tensor(self, value):
        """The mean of a scalar tensor over the processes, as a tensor (no wait for the device)."""
        if not self.enabled:
            return value
        t = value.detach().reshape(1).to(self.accelerator.device, torch.float32)
        return self.accelerator.reduce(t, reduction="mean")[0]

    def any(self, flag: bool) -> bool:
        """True on every process when the flag is set on any (a stop request, say)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    def barrier(self) -> None:
        if self.enabled:
            self.accelerator.wait_for_everyone()


SINGLE = Dist()


def detect(device: torch.device | None = None) -> Dist:
    """A Dist for this process: accelerate's when launched with several processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    from accelerate import Accelerator

    cpu = not torch.cuda.is_available() or (device is not None and torch.device(device).type == "cpu")
    acc = Accelerator(cpu=cpu)
    return Dist(rank=acc.process_index, world=acc.num_processes, accelerator=acc)
