"""Run records under logs/: the per-step CSV loss log and the resumable state of a stopped run.

CSV layout (readable by the reference's Plot tab, which takes the row starting with
``Step`` as the header): a few ``key,value`` rows describing the run, then
``Step,Epoch,Loss,Loss EMA,Learning Rate 1[,Learning Rate 2...],Time``, then one row per
optimizer step (1-based step, raw loss, EMA loss, the LRs used by that step, seconds since
the start). Rows are flushed as they are written, so a plot of a running job is current.
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import torch

from trainer.atomic import atomic_path


def timestamp() -> str:
    return time.strftime("%Y%m%d_%H%M%S")


def csv_path(logs_dir: Path, name: str, suffix: str = "") -> Path:
    """``logs/<YYYYMMDD>/<name><suffix>-<YYYYMMDD_HHMMSS>.csv``."""
    return Path(logs_dir) / time.strftime("%Y%m%d") / f"{name}{suffix}-{timestamp()}.csv"


class CsvLog:
    """Append-only CSV of one training pass."""

    def __init__(self, path: Path, info: dict, n_lrs: int, *, append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not (append and self.path.exists())
        self._fh = open(self.path, "a" if not fresh else "w", newline="", encoding="utf-8")
        self._w = csv.writer(self._fh)
        if fresh:
            for k, v in info.items():
                self._w.writerow([k, v])
            lrs = [f"Learning Rate {i + 1}" for i in range(max(1, n_lrs))]
            self._w.writerow(["Step", "Epoch", "Loss", "Loss EMA", *lrs, "Time"])
            self._fh.flush()

    def row(self, step: int, epoch, loss: float, ema: float, lrs: list, seconds: float) -> None:
        self._w.writerow([step, "" if epoch is None else epoch, f"{loss:.6g}", f"{ema:.6g}",
                          *[f"{lr:.6g}" for lr in lrs], f"{seconds:.2f}"])
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def state_path(logs_dir: Path, name: str) -> Path:
    """Where the resumable state of run ``name`` lives."""
    return Path(logs_dir) / "state" / f"{name}.pt"


def save_state(path: Path, state: dict, *, keep_previous: bool = False) -> Path | None:
    """Write a resumable state atomically (temp file + rename).

    ``keep_previous``: a state already at ``path`` belongs to another stopped run; it is renamed
    to ``<name>.<YYYYMMDD_HHMMSS>.pt`` beside it (returned) instead of being replaced.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        aside = None
        if keep_previous and path.exists():
            aside = path.with_name(f"{path.stem}.{timestamp()}{path.suffix}")
            os.replace(path, aside)
    return aside


_STATE_KEYS = ("step", "network", "optimizer", "scheduler", "task", "rng", "config")


class StateError(ValueError):
    """A resumable state file that cannot be used; the message names it and how to start over."""


def read_state(path: Path) -> dict:
    """The resumable state at ``path``; StateError naming the file for a missing, torn or foreign one."""
    path = Path(path)
    start_over = (f"To start over instead, move {path} away (or delete it) and run without resume.")
    if not path.is_file():
        raise StateError(
            f"no stopped run to resume: {path} does not exist. Resume needs a run of the same "
            "save_lora_name that was stopped (Ctrl-C or Stop) before it finished.")
    try:
        # The state holds numpy RNG state and python objects written by this program.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError... for torn files
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        size = path.stat().st_size
        what = "is empty (0 bytes)" if size == 0 else f"cannot be read ({detail})"
        raise StateError(f"the stopped run's state {path} {what}: it was cut off while being written or is "
                         f"not a TrainTrain state. {start_over}") from None
    missing = [k for k in _STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise StateError(f"{path} is not a TrainTrain resumable state (it lacks {', '.join(missing)}). "
                         f"{start_over}")
    return state


load_state = read_state
