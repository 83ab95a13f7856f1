"""The one training loop, shared by every mode and every pass.

A mode hands the loop a *task*: the trainable network, the effective settings of this pass
and a ``compute_loss(step)`` that runs one micro-batch forward and returns the loss. The
loop owns everything else: optimizer and scheduler, gradient accumulation, mixed precision,
gradient clipping, exactly ``train_iterations`` optimizer steps, the CSV log, progress
events, periodic saves, stop requests (finish the step, save, write a resumable state) and
resuming from such a state.

A step never waits for the device: its loss stays a device tensor, and the losses are read back
(one host-device sync for several steps) only at log intervals (``LoopOptions.log_every``; on a
GPU every ``GPU_LOG_EVERY`` steps, on a CPU every step, where reading costs nothing) and before
anything that needs them (a save, a stop, a preview, the end). The CSV still gets one row per
step, each with its own loss; between reads, progress events carry the last loss read. A loss
that is not finite stops the run at the read that finds it, naming its step.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np
import torch

from trainer.training.control import TrainControl

if TYPE_CHECKING:  # pragma: no cover
    from trainer.config import TrainConfig
from trainer.training.optim import optimizers, schedulers
from trainer.training.runlog import CsvLog, save_state


class Task(Protocol):
    """What a mode gives the loop for one training pass."""

    name: str                 # "main", or "copy" for Difference's first pass
    config: TrainConfig       # the effective settings of this pass
    network: torch.nn.Module  # the trainable network (already applied to the model)
    epoch: int | None         # current data epoch, when the task has epochs
    save_final: bool          # save the network when the pass ends
    skip_training: bool       # the pass has nothing to train and only saves (the job checks it)

    def param_groups(self) -> list[dict]: ...
    def compute_loss(self, step: int) -> torch.Tensor: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def metadata(self) -> dict[str, str]: ...  # extra header entries of this pass's files


@dataclass
class ProgressEvent:
    """Sent after every optimizer step (and once at start/end with a message)."""

    pass_name: str
    step: int
    total: int
    loss: float = float("nan")
    loss_ema: float = float("nan")
    lrs: list = field(default_factory=list)
    it_per_s: float = 0.0
    eta_s: float = 0.0
    epoch: int | None = None
    message: str = ""


@dataclass
class LoopOptions:
    """How one pass runs: where it writes, how it reports, how it is stopped."""

    save: Callable[[str, bool, int], Path]     # (file stem, is_final, optimizer steps done) -> saved path
    stem: str                                  # output name of this pass, e.g. "name" / "name_copy"
    device: torch.device
    model_dtype: torch.dtype = torch.float32   # autocast dtype (fp32 = no autocast)
    control: TrainControl = field(default_factory=TrainControl)  # stop / save-now in, progress out
    csv: CsvLog | None = None
    state_path: Path | None = None             # resumable state is written here on stop
    resume: dict | None = None                 # a state written by an earlier stop of this pass
    extra_state: dict = field(default_factory=dict)  # saved with the state (e.g. pass index)
    dist: object = None                        # trainer.training.distributed.Dist; None = one process
    estimate: object = None                    # trainer.training.memory.estimate.MemoryEstimate, for OOM advice
    free_memory: int | None = None             # free device memory when the run started
    keep_other_state: bool = False             # a state already at state_path is another run's: keep it
    preview: Callable[[int], object] | None = None  # called with the steps done after every step (renders when due)
    log_every: int = 0                         # steps between loss reads (0: GPU_LOG_EVERY on CUDA, else 1)


_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
GPU_LOG_EVERY = 10  # steps between loss reads on a GPU (each read waits for the device)


class SaveFailed(RuntimeError):
    """A network file could not be written; what was learned is kept in a resumable state
    (``state_path``) when that could be written."""

    def __init__(self, message: str, state_path: Path | None):
        super().__init__(message)
        self.state_path = state_path


class TrainingOutOfMemory(RuntimeError):
    """The device ran out of memory mid-run; what was learned so far is saved (``saved``)."""

    def __init__(self, message: str, saved: Path | None):
        super().__init__(message)
        self.saved = saved


@dataclass
class LoopResult:
    steps_done: int
    stopped: bool
    saved: list
    last_loss: float
    notes: list


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def run(task: Task, opts: LoopOptions) -> LoopResult:
    """Train ``task`` for its configured number of optimizer steps (or until stopped)."""
    from trainer.training.distributed import SINGLE

    dist = opts.dist or SINGLE
    cfg = task.config
    total = cfg.train_iterations
    accum = max(1, cfg.gradient_accumulation_steps)
    max_norm = cfg.train_max_grad_norm
    every = cfg.save_per_steps

    opt_info = optimizers.build_optimizer(
        cfg.train_optimizer, task.param_groups(), lr=cfg.train_learning_rate,
        settings=optimizers.parse_settings(cfg.train_optimizer_settings, field="train_optimizer_settings"),
        device=opts.device, network=task.network,
    )
    sched_info = schedulers.build_scheduler(
        cfg.train_lr_scheduler, opt_info, num_training_steps=total,
        warmup_steps=cfg.train_lr_warmup_steps, num_cycles=cfg.train_lr_scheduler_num_cycles or 1,
        power=cfg.train_lr_scheduler_power, step_rules=cfg.train_lr_step_rules,
        settings=optimizers.parse_settings(cfg.train_lr_scheduler_settings, field="train_lr_scheduler_settings"),
    )
    notes = list(opt_info.notes) + list(sched_info.notes)
    log_every = opts.log_every or (GPU_LOG_EVERY if opts.device.type == "cuda" else 1)
    if dist.is_main:
        kind = {"fused": "fused (one kernel per group)", "foreach": "foreach (multi-tensor)",
                "as set": "fused/foreach as train_optimizer_settings says"}.get(opt_info.step_kind, "its own")
        opts.control.log(f"  optimizer step: {opt_info.name}, {kind}; losses read back every "
                         f"{log_every} step{'s' if log_every > 1 else ''}")
    optimizer = opt_info.optimizer
    params = [p for g in optimizer.param_groups for p in g["params"]]
    scaler = torch.amp.GradScaler("cuda") if opts.model_dtype == torch.float16 and opts.device.type == "cuda" else None

    start, ema = 0, None
    if opts.resume:
        task.network.load_state_dict(opts.resume["network"])
        fresh = _fresh_schedule(optimizer, sched_info)
        opt_info.load_state_dict(opts.resume["optimizer"])
        sched_info.load_state_dict(opts.resume["scheduler"])
        _apply_fresh_schedule(optimizer, sched_info, fresh)
        task.load_state_dict(opts.resume["task"])
        _set_rng_state(opts.resume["rng"])
        start, ema = int(opts.resume["step"]), opts.resume.get("loss_ema")
        if scaler is not None and opts.resume.get("scaler"):
            scaler.load_state_dict(opts.resume["scaler"])
    optimizers.optimizer_train_mode(opt_info)
    _emit(opts, ProgressEvent(task.name, start, total, message=f"{task.name}: steps {start}/{total}"))

    saved: list[Path] = []
    last = float("nan")

    state_written = []

    def write_state(done: int) -> Path | None:
        if opts.state_path is None:
            return None
        keep = opts.keep_other_state and not state_written  # never put this run's own state aside
        state_written.append(done)
        aside = save_state(opts.state_path, {
            "step": done, "network": task.network.state_dict(), "optimizer": opt_info.state_dict(),
            "scheduler": sched_info.state_dict(), "task": task.state_dict(), "rng": _rng_state(),
            "loss_ema": ema, "scaler": scaler.state_dict() if scaler else None, **opts.extra_state,
        }, keep_previous=keep)
        if aside is not None:
            notes.append(f"the earlier stopped run's state was kept as {aside}; rename it to "
                         f"{Path(opts.state_path).name} to resume that run instead")
        return Path(opts.state_path)

    def save_or_keep(stem: str, done: int, final: bool) -> Path:
        try:
            return _save(opts, opt_info, stem, done, final=final)
        except OSError as error:
            problem = f"could not save {error.filename or stem}: {error.strerror or error}"
            try:
                kept = write_state(done)
            except OSError as state_error:
                raise SaveFailed(f"{problem}; the training state could not be written either "
                                 f"({state_error.strerror or state_error}), so this run's training is lost. "
                                 "Free some space or choose a writable folder and run again.", None) from error
            if kept is None:
                raise
            then = ("resume it, and it only saves the file" if final
                    else f"resume it to continue from step {done}")
            raise SaveFailed(f"{problem}. Nothing learned is lost: the training state (step {done}) is in "
                             f"{kept}. Free some space or fix the folder, then {then} (--resume, or tick "
                             "'resume the stopped run' on the page).", kept) from error
    pending: list[tuple] = []  # (step, epoch, loss tensor, lrs, seconds) of the steps not read yet

    def read_losses() -> None:
        """Read the pending steps' losses in one transfer; CSV rows, EMA and the finite check."""
        nonlocal ema, last
        if not pending:
            return
        values = torch.stack([p[2].detach().float().reshape(()) for p in pending]).cpu().tolist()
        rows = list(pending)
        pending.clear()
        for (at, epoch, _, lrs_at, elapsed), value in zip(rows, values):
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"the loss became {value} at step {at}; lower train_learning_rate, "
                    "or use bf16/fp32 model precision instead of fp16")
            last = value
            ema = value if ema is None else 0.9 * ema + 0.1 * value
            if opts.csv is not None and dist.is_main:
                opts.csv.row(at, epoch, value, ema, lrs_at, elapsed)

    t0, window = time.perf_counter(), []
    for step in range(start, total):
        tic = time.perf_counter()
        try:
            loss = _one_step(task, opts, dist, step, accum, scaler, optimizer, params, max_norm)
        except (_OOM, MemoryError) as exc:
            optimizer.zero_grad(set_to_none=True)
            if opts.device.type == "cuda":
                torch.cuda.empty_cache()
            kept = _save(opts, opt_info, f"{opts.stem}_{step}steps", step, final=False) if step > 0 and dist.is_main else None
            raise TrainingOutOfMemory(_oom_text(exc, opts, step, kept), kept) from exc
        lrs = sched_info.lr_values()  # after the step: schedule-free optimizers update it there
        sched_info.step(loss)  # only reduce_on_plateau reads the loss (and so waits for it)
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        pending.append((done, task.epoch, loss, lrs, time.perf_counter() - t0))
        if done % log_every == 0 or done == total:
            read_losses()
        window.append(time.perf_counter() - tic)
        window = window[-20:]
        rate = len(window) / sum(window) if sum(window) > 0 else 0.0
        if dist.is_main:
            _emit(opts, ProgressEvent(task.name, done, total, last, ema, lrs, rate,
                                      (total - done) / rate if rate else 0.0, task.epoch))

        if opts.preview is not None and dist.is_main:
            opts.preview(done)
        periodic = every > 0 and done % every == 0
        asked = opts.control.take_save_request()  # consumed even on the last step: the final save answers it
        if (periodic or asked) and done < total and dist.is_main:
            path = save_or_keep(f"{opts.stem}_{done}steps", done, final=False)
            saved.append(path)
            if asked:
                opts.control.log(f"saved {path} (step {done}); training goes on")
        if dist.any(opts.control.stop_requested) and done < total:
            read_losses()  # the state keeps the loss EMA
            if not dist.is_main:
                return LoopResult(done, True, saved, last, notes)
            write_state(done)  # first: a failing network save then loses nothing
            saved.append(save_or_keep(f"{opts.stem}_{done}steps", done, final=False))
            _emit(opts, ProgressEvent(task.name, done, total, last, ema, lrs, message="stopped"))
            return LoopResult(done, True, saved, last, notes)

    if task.save_final and dist.is_main:
        saved.append(save_or_keep(opts.stem, total, final=True))
    dist.barrier()
    return LoopResult(total, False, saved, last, notes)


def _one_step(task, opts: LoopOptions, dist, step: int, accum: int, scaler, optimizer, params,
              max_norm: float) -> torch.Tensor:
    """Forward/backward over ``accum`` micro-batches, clip, optimizer step; the mean loss as a
    device tensor (nothing here waits for the device)."""
    loss_sum = None
    for _ in range(accum):
        with _autocast(opts.device, opts.model_dtype):
            loss = dist.run(task.network, lambda: task.compute_loss(step))
        scaled = loss / accum
        (scaler.scale(scaled) if scaler else scaled).backward()
        value = loss.detach().float()
        loss_sum = value if loss_sum is None else loss_sum + value
    if max_norm > 0:
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return dist.mean_tensor(loss_sum / accum)


def _oom_text(exc, opts: LoopOptions, step: int, kept: Path | None) -> str:
    from trainer.training.memory.advice import oom_message

    return f"at step {step + 1}: " + oom_message(exc, opts.estimate, saved=kept, free=opts.free_memory)


def _save(opts: LoopOptions, opt_info, stem: str, steps: int, *, final: bool) -> Path:
    """Save the network after ``steps`` optimizer steps; schedule-free optimizers hold their best
    weights in eval mode."""
    optimizers.optimizer_eval_mode(opt_info)
    try:
        return opts.save(stem, final, steps)
    finally:
        if not final:
            optimizers.optimizer_train_mode(opt_info)


def _torch_schedulers(sched_info) -> list:
    found = []
    for sched in (sched_info.scheduler, sched_info.warmup):
        if sched is not None and hasattr(sched, "state_dict"):
            found.append(sched)
            found.extend(getattr(sched, "_schedulers", []))
    return found


# Scheduler attributes that depend on the run's length; a resumed run keeps the new request's.
_LENGTH_ATTRS = ("T_max", "total_steps", "_schedule_phases")


def _fresh_schedule(optimizer, sched_info) -> dict:
    """The learning rates and schedule lengths built from this request, before a state is loaded."""
    return {"lrs": [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups],
            "lengths": [(s, a, getattr(s, a)) for s in _torch_schedulers(sched_info) for a in _LENGTH_ATTRS
                        if hasattr(s, a)]}


def _apply_fresh_schedule(optimizer, sched_info, fresh: dict) -> None:
    """After loading a stopped run's optimizer and scheduler: keep the position in the schedule,
    take the learning rates and the run length of this request (which a resume may change)."""
    for sched, attr, value in fresh["lengths"]:
        setattr(sched, attr, value)
    ratios = []
    for group, new in zip(optimizer.param_groups, fresh["lrs"]):
        old = group.get("initial_lr", group["lr"])
        ratios.append(new / old if old and new != old else 1.0)
    if all(r == 1.0 for r in ratios):
        return
    for group, r in zip(optimizer.param_groups, ratios):
        for key in ("lr", "initial_lr", "scheduled_lr"):
            if isinstance(group.get(key), (int, float)):
                group[key] = group[key] * r
    for sched in _torch_schedulers(sched_info):
        for attr in ("base_lrs", "_last_lr"):
            values = getattr(sched, attr, None)
            if isinstance(values, list) and len(values) == len(ratios):
                setattr(sched, attr, [v * r for v, r in zip(values, ratios)])


def _emit(opts: LoopOptions, event: ProgressEvent) -> None:
    opts.control.progress(event)
