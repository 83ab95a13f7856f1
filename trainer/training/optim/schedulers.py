"""LR-scheduler factory: every name of `choices.LR_SCHEDULERS` (SPEC.md §3.2).

Eight names are torch schedulers with the reference's defaults (`cosine_annealing`: T_max = the run's
length; `cosine_annealing_with_restarts`: T_0=10; `exponential`: gamma=0.9; `step`: step_size=10;
`multi_step`: milestones=[30,60,90]; `reduce_on_plateau`: mode='min'; `cyclic`: base_lr=1e-5,
max_lr=1e-3, triangular; `one_cycle`: max_lr=1e-3, total_steps = the run's length). The others come
from diffusers' schedule functions (`diffusers.optimization`), called the way `get_scheduler` calls
them: warm-up and training steps, `num_cycles` for `cosine_with_restarts` (values <= 0 become 1),
`power` for `polynomial` (values <= 0 become 1.0) and `step_rules` for `piecewise_constant`.

Changes from the reference:
- Settings are checked against what the chosen scheduler accepts and raise `OptimizerSettingsError`
  listing the accepted names. The reference hands them to `get_scheduler`, which takes no extra
  keywords, so any setting broke the diffusers schedulers; here they reach the schedule function
  itself (e.g. `lr_end` of `polynomial`, `num_cycles` of `cosine`). A setting that a main parameter
  owns (warm-up steps, run length, step rules, cycles, power) names that parameter instead.
- Warm-up also works with the torch schedulers: a linear warm-up from lr/(W+1) to lr over the first W
  steps (`LinearLR` + `SequentialLR`), then the scheduler over the remaining N-W steps.
  `one_cycle` has its own rising phase, so warm-up sets its `pct_start` to W/N instead, and
  `reduce_on_plateau` starts watching the loss after the warm-up. `constant` and
  `piecewise_constant` have no warm-up; a note says so.
- `reduce_on_plateau` is stepped with the loss (`SchedulerInfo.step(loss)`); the reference stepped it
  without one and failed.
- `one_cycle` runs exactly N steps, as the training loop does; the reference overran by one.
- `cyclic`/`one_cycle` cycle momentum only when the optimizer has a momentum or betas (torch raises
  otherwise).
- Schedule-free optimizers get no scheduler, and AdaFactor with `relative_step` gets
  `AdafactorSchedule` whatever was chosen, as in the reference; a note says which.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch.optim import lr_scheduler

from trainer.compat import scheduler_function
from trainer.training.optim.settings import (
    SCHEDULER_FIELD,
    OptimizerSettingsError,
    accepted_keywords,
    check_keywords,
    parse_settings,
)

if TYPE_CHECKING:
    from trainer.training.optim.optimizers import OptimizerInfo

_TORCH_DEFAULTS: dict[str, tuple[str, dict[str, object]]] = {
    "cosine_annealing": ("CosineAnnealingLR", {}),
    "cosine_annealing_with_restarts": ("CosineAnnealingWarmRestarts", {"T_0": 10}),
    "exponential": ("ExponentialLR", {"gamma": 0.9}),
    "step": ("StepLR", {"step_size": 10}),
    "multi_step": ("MultiStepLR", {"milestones": [30, 60, 90]}),
    "reduce_on_plateau": ("ReduceLROnPlateau", {"mode": "min"}),
    "cyclic": ("CyclicLR", {"base_lr": 1e-5, "max_lr": 1e-3, "mode": "triangular"}),
    "one_cycle": ("OneCycleLR", {"max_lr": 1e-3}),
}
_NOT_SETTINGS = ("optimizer", "last_epoch", "verbose")
_ONE_CYCLE_OWNED = {"total_steps": "train_iterations", "epochs": "train_iterations",
                    "steps_per_epoch": "train_iterations"}
_DIFFUSERS_OWNED = {"num_warmup_steps": "train_lr_warmup_steps", "num_training_steps": "train_iterations",
                    "step_rules": "train_lr_step_rules"}
_STEP_RULES_EXAMPLE = "1:100,0.5:200,0.1 (multiplier 1 until step 100, 0.5 until step 200, then 0.1)"


@dataclass
class SchedulerInfo:
    """A built LR scheduler (or None) and how to step it and read the current LRs.

    Call `step(loss)` once after every optimizer step.

    Attributes:
        scheduler: the torch scheduler, or None (schedule-free optimizers).
        name: the schedule that runs: a name of `choices.LR_SCHEDULERS`, or "adafactor".
        optimizer_info: the optimizer it drives.
        notes: warnings to show the user.
        kwargs: the keyword arguments the scheduler was built with.
        warmup: the linear warm-up, set only for `reduce_on_plateau` with warm-up (which
            `SequentialLR` cannot chain); other warm-ups live inside `scheduler`.
        warmup_steps: the steps `warmup` runs before the plateau watch starts.
        steps_taken: how many times `step` was called.
    """

    scheduler: object | None
    name: str
    optimizer_info: OptimizerInfo
    notes: list[str] = field(default_factory=list)
    kwargs: dict[str, object] = field(default_factory=dict)
    warmup: lr_scheduler.LRScheduler | None = None
    warmup_steps: int = 0
    steps_taken: int = 0

    def step(self, loss: float | torch.Tensor | None = None) -> None:
        """Advance one optimizer step; `reduce_on_plateau` needs the step's loss, the others ignore it."""
        if self.warmup is not None and self.steps_taken < self.warmup_steps:
            self.warmup.step()
        elif isinstance(self.scheduler, lr_scheduler.ReduceLROnPlateau):
            if loss is None:
                raise ValueError("reduce_on_plateau lowers the LR when the loss stops falling: pass the "
                                 "step's loss to SchedulerInfo.step(loss).")
            self.scheduler.step(float(loss))
        elif self.scheduler is not None:
            self.scheduler.step()
        self.steps_taken += 1

    def lr_values(self) -> list[float]:
        """The current LR of each parameter group, for logs and progress."""
        info = self.optimizer_info
        if info.uses_own_schedule and self.scheduler is not None:
            return [float(lr) for lr in self.scheduler.get_lr()]
        groups = info.optimizer.param_groups
        if info.is_schedule_free:
            return [float(g.get("scheduled_lr", g["lr"])) for g in groups]
        return [float(g["lr"]) for g in groups]

    def state_dict(self) -> dict:
        """Everything needed to resume: the step count and the schedulers' states."""
        return {"steps_taken": self.steps_taken,
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "warmup": self.warmup.state_dict() if self.warmup is not None else None}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned, on a scheduler built with the same arguments."""
        self.steps_taken = int(state["steps_taken"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.warmup is not None and state.get("warmup") is not None:
            self.warmup.load_state_dict(state["warmup"])


def resolve_scheduler_name(name: str) -> str:
    """The canonical spelling of an LR scheduler name, parsed as the settings parse it (one parser,
    in ``trainer.config.values``); ValueError (ConfigError) with the nearest if unknown."""
    from trainer.config.schema import param
    from trainer.config.values import to_typed

    return to_typed(param("train_lr_scheduler"), name)


def _check_steps(num_training_steps: int, warmup_steps: int) -> None:
    if int(num_training_steps) < 1:
        raise ValueError(f"`train_iterations` must be at least 1, not {num_training_steps}.")
    if int(warmup_steps) < 0 or int(warmup_steps) >= int(num_training_steps):
        raise ValueError(f"`train_lr_warmup_steps` must be from 0 to train_iterations - 1 "
                         f"({int(num_training_steps) - 1}), not {warmup_steps}.")


def _has_momentum(optimizer: torch.optim.Optimizer) -> bool:
    return "momentum" in optimizer.defaults or "betas" in optimizer.defaults


def _torch_kwargs(name: str, optimizer, n: int, w: int, settings: dict) -> dict[str, object]:
    """Defaults (some computed from the run's length), overridden by the settings."""
    kwargs = dict(_TORCH_DEFAULTS[name][1])
    if name == "cosine_annealing":
        kwargs["T_max"] = n - w
    if name in ("cyclic", "one_cycle"):
        kwargs["cycle_momentum"] = _has_momentum(optimizer)
    if name == "one_cycle":
        kwargs["total_steps"] = n
        if w > 0:
            kwargs["pct_start"] = w / n
    kwargs.update(settings)
    return kwargs


def _call(what: str, factory, optimizer, kwargs: dict):
    """Build a scheduler; a value it rejects is reported against the settings field."""
    try:
        return factory(optimizer, **kwargs)
    except (ValueError, TypeError, ZeroDivisionError) as error:
        raise OptimizerSettingsError(f"{what} rejected its arguments {kwargs}: {error}. "
                                     f"Check `{SCHEDULER_FIELD}` and the other LR scheduler parameters.") from error


def _build_torch(name: str, optimizer, n: int, w: int, settings: dict, notes: list[str]) -> tuple:
    """A torch scheduler, wrapped with a linear warm-up when `w` > 0. Returns (scheduler, warmup, kwargs)."""
    cls = getattr(lr_scheduler, _TORCH_DEFAULTS[name][0])
    check_keywords(settings, accepted_keywords(cls, exclude=_NOT_SETTINGS), field=SCHEDULER_FIELD,
                   what=f"{name} ({cls.__name__})", owned=_ONE_CYCLE_OWNED if name == "one_cycle" else None)
    kwargs = _torch_kwargs(name, optimizer, n, w, settings)
    if name == "multi_step" and all(int(m) >= n for m in kwargs["milestones"]):
        notes.append(f"multi_step: the milestones {kwargs['milestones']} are all at or after the run's last step "
                     f"({n}), so the LR never changes. Set milestones=[...] in {SCHEDULER_FIELD}.")
    if name == "cyclic":
        notes.append(f"cyclic moves the LR between base_lr={kwargs['base_lr']} and max_lr={kwargs['max_lr']}; "
                     f"the learning rates you entered are not used. Change them in {SCHEDULER_FIELD}.")
    if name == "one_cycle":
        notes.append(f"one_cycle rises to max_lr={kwargs['max_lr']} and falls again; the learning rates you "
                     f"entered are not used. Change max_lr in {SCHEDULER_FIELD}.")
    main = _call(name, cls, optimizer, kwargs)
    if w == 0 or name == "one_cycle":
        return main, None, kwargs
    warmup = lr_scheduler.LinearLR(optimizer, start_factor=1.0 / (w + 1), end_factor=1.0, total_iters=w)
    if name == "reduce_on_plateau":
        return main, warmup, kwargs
    return lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[w]), None, kwargs


def _check_step_rules(step_rules: str) -> str:
    rules = str(step_rules or "").replace(" ", "")
    parts = rules.split(",")
    try:
        for part in parts[:-1]:
            multiplier, steps = part.split(":")
            float(multiplier), int(steps)
        float(parts[-1])
    except ValueError:
        raise ValueError(f"`train_lr_step_rules` must be 'multiplier:step' pairs and a final multiplier, "
                         f"for example {_STEP_RULES_EXAMPLE}; got '{step_rules}'.") from None
    return rules


def _diffusers_kwargs(name: str, params, n: int, w: int, num_cycles, power, step_rules: str) -> dict:
    """The arguments `get_scheduler` would pass to this schedule function."""
    kwargs: dict[str, object] = {}
    if "num_warmup_steps" in params:
        kwargs["num_warmup_steps"] = w
    if "num_training_steps" in params:
        kwargs["num_training_steps"] = n
    if name == "cosine_with_restarts":
        kwargs["num_cycles"] = int(num_cycles) if num_cycles and num_cycles > 0 else 1
    if name == "polynomial":
        kwargs["power"] = float(power) if power and power > 0 else 1.0
    if name == "piecewise_constant":
        kwargs["step_rules"] = _check_step_rules(step_rules)
    return kwargs


def _build_diffusers(name: str, optimizer, n: int, w: int, settings: dict, notes: list[str], *,
                     num_cycles, power, step_rules: str) -> tuple:
    from diffusers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    func = scheduler_function(name, TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)])
    params = inspect.signature(func).parameters
    owned = dict(_DIFFUSERS_OWNED)
    if name == "cosine_with_restarts":
        owned["num_cycles"] = "train_lr_scheduler_num_cycles"
    if name == "polynomial":
        owned["power"] = "train_lr_scheduler_power"
    check_keywords(settings, accepted_keywords(func, exclude=_NOT_SETTINGS + tuple(owned)), field=SCHEDULER_FIELD,
                   what=f"{name} (diffusers)", owned={k: v for k, v in owned.items() if k in params})
    if w > 0 and "num_warmup_steps" not in params:
        notes.append(f"{name} has no warm-up, so train_lr_warmup_steps={w} is not used; "
                     f"constant_with_warmup or linear has one.")
    kwargs = {**_diffusers_kwargs(name, params, n, w, num_cycles, power, step_rules), **settings}
    return _call(name, func, optimizer, kwargs), None, kwargs


def build_scheduler(name: str, optimizer_info: OptimizerInfo, *, num_training_steps: int, warmup_steps: int = 0,
                    num_cycles: float = 1, power: float = 1.0, step_rules: str = "",
                    settings: dict[str, object] | str | None = None) -> SchedulerInfo:
    """Build the LR scheduler `name` for a run of `num_training_steps` optimizer steps.

    Args:
        name: a name of `choices.LR_SCHEDULERS`, any case.
        optimizer_info: what `build_optimizer` returned.
        num_training_steps: N, the optimizer steps of the run (`train_iterations`).
        warmup_steps: `train_lr_warmup_steps`, from 0 to N-1.
        num_cycles: `train_lr_scheduler_num_cycles` (cosine_with_restarts).
        power: `train_lr_scheduler_power` (polynomial).
        step_rules: `train_lr_step_rules` (piecewise_constant).
        settings: `train_lr_scheduler_settings`, parsed (see `parse_settings`) or as text.

    Returns:
        SchedulerInfo; its `scheduler` is None for schedule-free optimizers.

    Raises:
        ValueError: unknown name, bad step counts or step rules.
        OptimizerSettingsError: a setting the scheduler does not take or rejects.
    """
    canonical = resolve_scheduler_name(name)
    n, w = int(num_training_steps), int(warmup_steps)
    _check_steps(n, w)
    settings = parse_settings(settings, field=SCHEDULER_FIELD) if isinstance(settings, str) else dict(settings or {})
    optimizer = optimizer_info.optimizer
    notes: list[str] = []
    ignored = f"the scheduler '{canonical}' and the {SCHEDULER_FIELD} are" if settings else \
        f"the scheduler '{canonical}' is"
    if optimizer_info.is_schedule_free:
        warmup_hint = (" For a warm-up, set warmup_steps=... in train_optimizer_settings."
                       if "warmup_steps" in optimizer.defaults else "")
        notes.append(f"{optimizer_info.name} is schedule-free: it uses no LR scheduler, so {ignored} "
                     f"ignored.{warmup_hint}")
        return SchedulerInfo(None, canonical, optimizer_info, notes)
    if optimizer_info.uses_own_schedule:
        from transformers.optimization import AdafactorSchedule

        notes.append(f"AdaFactor with relative_step=True uses AdafactorSchedule, so {ignored} ignored.")
        return SchedulerInfo(AdafactorSchedule(optimizer, initial_lr=optimizer_info.lr), "adafactor",
                             optimizer_info, notes)
    if canonical in _TORCH_DEFAULTS:
        scheduler, warmup, kwargs = _build_torch(canonical, optimizer, n, w, settings, notes)
    else:
        scheduler, warmup, kwargs = _build_diffusers(canonical, optimizer, n, w, settings, notes,
                                                     num_cycles=num_cycles, power=power, step_rules=step_rules)
    return SchedulerInfo(scheduler, canonical, optimizer_info, notes, kwargs, warmup, w if warmup else 0)

