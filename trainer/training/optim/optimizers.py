"""Optimizer factory: every name of `choices.OPTIMIZERS`, built from the library that provides it.

Backends (SPEC.md §3.2): torch (`Adam`, `AdamW`, `SGDNesterov`), bitsandbytes (`*8bit`, `Paged*`),
dadaptation (`DAdapt*`/`Dadapt*`), prodigyopt (`Prodigy`), transformers (`AdaFactor`), lion-pytorch
(`Lion`), schedulefree (`*ScheduleFree`) and pytorch-optimizer (`CAME`, `Tiger`, `AdamMini`). A backend
is imported only when its optimizer is chosen: importing bitsandbytes alone takes seconds.

Behaviour kept from the reference: `SGDNesterov*` default to `momentum=0.9` and always use
`nesterov=True` (bitsandbytes' 8-bit SGD ignores it; a note says so); `AdaFactor` defaults to
`relative_step=True` (forced on by `warmup_init=True`), and then takes no LR; `DAdapt*`/`Prodigy` warn
when the LR is at most 0.1; `AdamMini` is built from the network module; schedule-free optimizers are
switched to train mode once built.

Changes from the reference, each reported in `OptimizerInfo.notes` or as an error:
- Names match case-insensitively; an unknown name (or the list's separator entry) raises a
  `ValueError` with the choices and the nearest name.
- Settings are checked against the optimizer's constructor before it is built: a keyword it does not
  take raises `OptimizerSettingsError` with the accepted ones (several packages swallow unknown
  keywords in `**kwargs`, so a misspelt setting would otherwise do nothing).
- A missing package raises `OptimizerUnavailableError` naming the pip package and the nearest optimizer
  that is installed. bitsandbytes optimizers run on cuda and cpu (cpu measured with 0.50.2); on other
  devices they raise the same error. `Paged*` optimizers on a device other than cuda run unpaged:
  paging moves optimizer state between GPU and host memory, which only exists on cuda; bitsandbytes
  falls back to the same maths, and a note says so.
- `DAdapt*`/`Prodigy` refuse differing group LRs (text encoder vs. U-Net) before training starts:
  they estimate one step size, and the libraries either raise at the first step or silently use the
  first group's LR.
- `AdamMini` keeps the per-group LRs (text encoder vs. U-Net) and trains only the given parameters.
- Schedule-free optimizers get `optimizer_eval_mode`/`optimizer_train_mode`: their eval weights
  (the averaged sequence) are the ones to save, which the reference never switches to.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from trainer.config.choices import OPTIMIZERS
from trainer.compat import (
    DADAPTATION, DADAPTATION_LION, import_quietly, install_command, installed_version, version_below,
)
from trainer.training.optim.settings import (
    OPTIMIZER_FIELD,
    OptimizerSettingsError,
    accepted_keywords,
    check_keywords,
    parse_settings,
)

__all__ = [
    "OptimizerInfo", "OptimizerSettingsError", "OptimizerUnavailableError",
    "build_optimizer", "optimizer_eval_mode", "optimizer_train_mode",
    "parse_settings", "resolve_optimizer_name",
]

# Devices where bitsandbytes' optimizers have kernels that were verified (cpu: ENV-NOTES §3).
_BNB_DEVICES = ("cuda", "cpu")
_LR_NEAR_ONE_LIMIT = 0.1


class OptimizerUnavailableError(RuntimeError):
    """The chosen optimizer cannot run here: its package is missing or does not support the device."""


@dataclass
class _Spec:
    """Where an optimizer comes from and what the factory does around it."""

    module: str
    attr: str
    package: str
    fallbacks: tuple[str, ...] = ("AdamW",)
    defaults: dict[str, object] = field(default_factory=dict)
    forced: dict[str, object] = field(default_factory=dict)
    kind: str = "plain"  # plain | lr_near_one | adafactor | schedule_free | adam_mini
    paged: bool = False
    minimum: str | None = None  # the oldest release of `package` that has this optimizer


def _bnb(attr: str, fallbacks: tuple[str, ...], paged: bool = False, **extra) -> _Spec:
    return _Spec("bitsandbytes.optim", attr, "bitsandbytes", fallbacks, paged=paged, **extra)


def _dadapt(attr: str, minimum: str = DADAPTATION.minimum) -> _Spec:
    return _Spec("dadaptation", attr, "dadaptation", ("Prodigy", "AdamW"), kind="lr_near_one", minimum=minimum)


def _schedule_free(attr: str) -> _Spec:
    return _Spec("schedulefree", attr, "schedulefree", ("AdamW",), kind="schedule_free")


_NESTEROV = {"defaults": {"momentum": 0.9}, "forced": {"nesterov": True}}
_SPECS: dict[str, _Spec] = {
    "AdamW": _Spec("torch.optim", "AdamW", "torch", ()),
    "Adam": _Spec("torch.optim", "Adam", "torch", ("AdamW",)),
    "SGDNesterov": _Spec("torch.optim", "SGD", "torch", ("AdamW",), **_NESTEROV),
    "AdamW8bit": _bnb("AdamW8bit", ("AdamW",)),
    "Adam8bit": _bnb("Adam8bit", ("Adam",)),
    "SGDNesterov8bit": _bnb("SGD8bit", ("SGDNesterov",), **_NESTEROV),
    "Lion8bit": _bnb("Lion8bit", ("Lion", "AdamW")),
    "PagedAdamW8bit": _bnb("PagedAdamW8bit", ("AdamW8bit", "AdamW"), paged=True),
    "PagedLion8bit": _bnb("PagedLion8bit", ("Lion8bit", "Lion", "AdamW"), paged=True),
    "PagedAdamW": _bnb("PagedAdamW", ("AdamW",), paged=True),
    "PagedAdamW32bit": _bnb("PagedAdamW32bit", ("AdamW",), paged=True),
    "DadaptAdam": _dadapt("DAdaptAdam"),
    "DadaptLion": _dadapt("DAdaptLion", DADAPTATION_LION.minimum),  # dadaptation 2.0 has no DAdaptLion
    "DAdaptAdaGrad": _dadapt("DAdaptAdaGrad"),
    "DAdaptAdan": _dadapt("DAdaptAdan"),
    "DAdaptSGD": _dadapt("DAdaptSGD"),
    "Prodigy": _Spec("prodigyopt", "Prodigy", "prodigyopt", ("DadaptAdam", "AdamW"), kind="lr_near_one"),
    "AdaFactor": _Spec("transformers.optimization", "Adafactor", "transformers", ("CAME", "AdamW"), kind="adafactor"),
    "Lion": _Spec("lion_pytorch", "Lion", "lion-pytorch", ("Lion8bit", "AdamW")),
    "RAdamScheduleFree": _schedule_free("RAdamScheduleFree"),
    "AdamWScheduleFree": _schedule_free("AdamWScheduleFree"),
    "SGDScheduleFree": _schedule_free("SGDScheduleFree"),
    "CAME": _Spec("pytorch_optimizer", "CAME", "pytorch-optimizer", ("AdaFactor", "AdamW")),
    "Tiger": _Spec("pytorch_optimizer", "Tiger", "pytorch-optimizer", ("Lion", "AdamW")),
    "AdamMini": _Spec("pytorch_optimizer", "AdamMini", "pytorch-optimizer", ("AdamW",), kind="adam_mini"),
}
assert set(_SPECS) == set(OPTIMIZERS), "every choice needs a backend entry"  # guards choices.py edits


@dataclass
class OptimizerInfo:
    """A built optimizer and what the rest of the trainer needs to know about it.

    Attributes:
        optimizer: the torch optimizer.
        name: the canonical name from `choices.OPTIMIZERS`.
        kwargs: the keyword arguments it was built with (defaults, settings and `lr`).
        notes: warnings to show the user.
        is_schedule_free: a schedule-free optimizer: no LR scheduler; switch modes around saving.
        uses_own_schedule: AdaFactor with `relative_step`: it sets its own LR.
        lr: the main learning rate that was asked for.
        step_kind: how a torch optimizer updates its tensors: "fused" (one kernel, CUDA), "foreach"
            (multi-tensor), "as set" (the user's setting), or "" (not a torch optimizer that offers them).
    """

    optimizer: torch.optim.Optimizer
    name: str
    kwargs: dict[str, object]
    notes: list[str] = field(default_factory=list)
    is_schedule_free: bool = False
    uses_own_schedule: bool = False
    lr: float = 0.0
    step_kind: str = ""

    def state_dict(self) -> dict:
        """The optimizer's state, for resuming. Schedule-free: save it with the weights, in the same mode."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved state; a schedule-free optimizer is then in train mode.

        Load the weights first: a state saved in eval mode turns the loaded (eval) weights back into
        the train-mode ones, and a state saved in train mode leaves them as they are.
        """
        self.optimizer.load_state_dict(state)
        if self.is_schedule_free:
            self.optimizer.train()


def resolve_optimizer_name(name: str) -> str:
    """The canonical spelling of an optimizer name, parsed as the settings parse it (one parser
    for the name, in ``trainer.config.values``), for callers that pass a name themselves.

    Raises:
        ValueError (ConfigError): an unknown name, with the nearest choice and the full list.
    """
    from trainer.config.schema import param
    from trainer.config.values import to_typed

    return to_typed(param("train_optimizer"), name)


def _installed(name: str) -> bool:
    top = _SPECS[name].module.split(".")[0]
    return importlib.util.find_spec(top) is not None


def _nearest_available(name: str, device: torch.device | None = None) -> str:
    for candidate in _SPECS[name].fallbacks:
        spec = _SPECS[candidate]
        if (_installed(candidate) and _too_old(candidate) is None
                and (spec.package != "bitsandbytes" or device is None or device.type in _BNB_DEVICES)):
            return candidate
    return "AdamW"


def _check_device(name: str, device: torch.device, notes: list[str]) -> None:
    spec = _SPECS[name]
    if spec.package != "bitsandbytes":
        return
    if device.type not in _BNB_DEVICES:
        raise OptimizerUnavailableError(
            f"`train_optimizer` {name} (bitsandbytes) does not run on device '{device.type}'; it runs on "
            f"{' and '.join(_BNB_DEVICES)}. Choose {_nearest_available(name, device)} instead.")
    if spec.paged and device.type != "cuda":
        notes.append(f"{name}: paging needs a CUDA GPU; on '{device.type}' it runs unpaged, with the same "
                     f"maths as {spec.fallbacks[0]}.")


def _too_old(name: str) -> str | None:
    """The installed version of the optimizer's package when it is older than the optimizer needs."""
    spec = _SPECS[name]
    version = installed_version(spec.package) if spec.minimum else None
    return version if version is not None and version_below(version, spec.minimum) else None


def availability_problem(name: str) -> str | None:
    """Why optimizer ``name`` cannot be built here (its package missing or too old), or None.

    Cheap (no import of the package): the run's checks call it before anything is loaded.
    """
    canonical = resolve_optimizer_name(name)
    spec = _SPECS[canonical]
    if not _installed(canonical):
        return (f"train_optimizer {canonical} needs the Python package '{spec.package}', which is not installed; "
                f"install it with: {install_command(spec.package)}, or choose {_nearest_available(canonical)}")
    old = _too_old(canonical)
    if old is not None:
        return (f"train_optimizer {canonical} needs {spec.package} >= {spec.minimum}, but {old} is installed; "
                f"install a newer one with: {install_command(spec.package)}, or choose "
                f"{_nearest_available(canonical)}")
    return None


def _load_class(name: str, device: torch.device) -> type:
    spec = _SPECS[name]
    try:
        module = import_quietly(spec.module)
    except ImportError as error:
        raise OptimizerUnavailableError(
            f"`train_optimizer` {name} needs the Python package '{spec.package}', which is not installed "
            f"({error}). Install it with: {install_command(spec.package)} (this keeps the web UI's packages "
            f"as they are), or choose {_nearest_available(name, device)}, which is installed.") from error
    except (OSError, RuntimeError) as error:  # a broken native library inside the package
        raise OptimizerUnavailableError(
            f"`train_optimizer` {name}: the package '{spec.package}' is installed but fails to load ({error}). "
            f"Reinstall it, or choose {_nearest_available(name, device)}.") from error
    old = _too_old(name)
    if old is not None or not hasattr(module, spec.attr):
        needed = f"{spec.package} >= {spec.minimum}" if spec.minimum else f"a newer {spec.package}"
        raise OptimizerUnavailableError(
            f"`train_optimizer` {name} needs {needed}; the installed {spec.package} "
            f"{old or installed_version(spec.package) or ''} has no {spec.attr}. Install a newer one with: "
            f"{install_command(spec.package)}, or choose {_nearest_available(name, device)}.")
    return getattr(module, spec.attr)


def _normalise_groups(param_groups: Iterable, lr: float) -> list[dict]:
    """Copies of the parameter groups (tensors alone make one group), empty groups dropped."""
    items = list(param_groups)
    if items and isinstance(items[0], torch.Tensor):
        items = [{"params": items}]
    groups = []
    for group in items:
        copy = dict(group)
        params = copy["params"]
        copy["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        copy.setdefault("lr", lr)
        if copy["params"]:
            groups.append(copy)
    if not groups:
        raise ValueError("The optimizer got no trainable parameters: every parameter group is empty.")
    return groups


def _apply_defaults(name: str, settings: dict[str, object], notes: list[str]) -> dict[str, object]:
    spec = _SPECS[name]
    kwargs = {**spec.defaults, **settings}
    for key, value in spec.forced.items():
        if key in settings and settings[key] != value:
            notes.append(f"{name} always uses {key}={value}; the setting {key}={settings[key]!r} is ignored.")
        kwargs[key] = value
    return kwargs


def _adafactor_lr(kwargs: dict[str, object], groups: list[dict], lr: float, notes: list[str]) -> bool:
    """Apply AdaFactor's LR rules; returns whether it schedules its own LR (relative_step)."""
    relative = bool(kwargs.get("relative_step", True))
    if kwargs.get("warmup_init") and not relative:
        notes.append("AdaFactor: warmup_init=True needs relative_step=True, so relative_step is turned on.")
        relative = True
    kwargs["relative_step"] = relative
    if not relative:
        kwargs["lr"] = lr
        return False
    kwargs["lr"] = None
    for group in groups:
        group.pop("lr", None)
    notes.append("AdaFactor with relative_step=True sets its own learning rate: the learning rates you entered "
                 "are not used, and AdafactorSchedule replaces the LR scheduler. "
                 "Set relative_step=False in train_optimizer_settings to use them.")
    return True


def _check_adaptive_lr(name: str, groups: list[dict], lr: float, notes: list[str]) -> None:
    """D-Adaptation and Prodigy estimate one step size for all parameters, so they take one LR.

    Prodigy, DAdaptAdam, DAdaptLion and DAdaptSGD raise at their first step when group LRs differ;
    DAdaptAdan and DAdaptAdaGrad silently use the first group's. Both are caught here, before training.
    """
    group_lrs = sorted({float(g["lr"]) for g in groups})
    if group_lrs != [float(lr)]:
        raise ValueError(
            f"{name} adapts one step size for all parameters and takes a single learning rate, but the parameter "
            f"groups have {', '.join(f'{v:g}' for v in group_lrs)}. Leave `train_textencoder_learning_rate` "
            f"blank, or set it equal to `train_learning_rate` ({lr:g}).")
    if lr <= _LR_NEAR_ONE_LIMIT:
        notes.append(f"{name} expects a learning rate near 1.0 (it adapts the step size itself), but a learning "
                     f"rate of {lr:g} was given; such a small value makes training very slow.")


def _keep_given_groups(optimizer: torch.optim.Optimizer, groups: list[dict]) -> torch.optim.Optimizer:
    """AdamMini makes one group per trainable parameter of the network: keep the given ones, with their LRs."""
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    kept = [g for g in optimizer.param_groups if id(g["params"][0]) in lr_of]
    if not kept:
        raise ValueError("AdamMini: none of the network's trainable parameters is in the parameter groups.")
    for group in kept:
        group["lr"] = lr_of[id(group["params"][0])]
    optimizer.param_groups = kept
    return optimizer


def _construct(name: str, cls: type, groups: list[dict], kwargs: dict, network) -> torch.optim.Optimizer:
    from_network = _SPECS[name].kind == "adam_mini"
    if from_network and network is None:
        raise ValueError(f"{name} is built from the network module: pass `network=` to build_optimizer.")
    try:
        optimizer = cls(network if from_network else groups, **kwargs)
    except (ValueError, TypeError, NotImplementedError) as error:  # bitsandbytes' SGD8bit: NotImplementedError
        raise OptimizerSettingsError(
            f"{name} rejected its arguments {kwargs}: {error}. "
            f"Check `train_learning_rate` and `{OPTIMIZER_FIELD}`.") from error
    return _keep_given_groups(optimizer, groups) if from_network else optimizer


def _multi_tensor_step(cls: type, accepted, kwargs: dict, groups: list[dict], device: torch.device) -> str:
    """Ask a torch optimizer (AdamW, Adam, SGD...) for its multi-tensor update where the user set
    neither ``fused`` nor ``foreach``: ``fused`` (one kernel per parameter group) when every
    parameter is a float tensor on CUDA, ``foreach`` otherwise. Same maths as the per-tensor loop,
    far fewer kernel launches for a network of hundreds of small tensors. Returns what was chosen."""
    if not cls.__module__.startswith("torch.optim") or not {"fused", "foreach"} <= set(accepted):
        return ""
    if kwargs.get("fused") is not None or kwargs.get("foreach") is not None:
        return "as set"
    params = [p for g in groups for p in g["params"]]
    on_cuda = device.type == "cuda" and all(p.is_cuda and p.is_floating_point() for p in params)
    kind = "fused" if on_cuda else "foreach"
    kwargs[kind] = True
    return kind


def build_optimizer(name: str, param_groups: Iterable, *, lr: float, settings: dict[str, object] | str | None = None,
                    device: torch.device | str, network: torch.nn.Module | None = None) -> OptimizerInfo:
    """Build the optimizer `name` for the given parameters.

    Args:
        name: a name of `choices.OPTIMIZERS`, any case.
        param_groups: parameter groups (dicts with `params` and optionally `lr`, e.g. text encoder and
            U-Net) or plain tensors.
        lr: the main learning rate; groups without their own `lr` use it.
        settings: `train_optimizer_settings`, parsed (see `parse_settings`) or as text.
        device: where the parameters live; decides whether bitsandbytes can run.
        network: the trainable network module; needed by AdamMini only.

    Returns:
        OptimizerInfo with the optimizer and the notes to show the user.

    Raises:
        ValueError: unknown name, or no parameters.
        OptimizerSettingsError: a setting the optimizer does not take or rejects.
        OptimizerUnavailableError: the backend is missing or cannot run on `device`.
    """
    canonical = resolve_optimizer_name(name)
    spec = _SPECS[canonical]
    device = torch.device(device)
    notes: list[str] = []
    groups = _normalise_groups(param_groups, lr)
    _check_device(canonical, device, notes)
    cls = _load_class(canonical, device)
    settings = parse_settings(settings, field=OPTIMIZER_FIELD) if isinstance(settings, str) else dict(settings or {})
    accepted = accepted_keywords(cls, exclude=("params", "model", "lr", "args"))
    check_keywords(settings, accepted, field=OPTIMIZER_FIELD, what=canonical,
                   owned={"lr": "train_learning_rate"})
    kwargs = _apply_defaults(canonical, settings, notes)
    if canonical == "SGDNesterov8bit":
        # bitsandbytes' SGD8bit takes `nesterov` but its 8-bit update has no Nesterov term.
        notes.append("SGDNesterov8bit: bitsandbytes' 8-bit SGD ignores nesterov=True, so this runs 8-bit SGD "
                     "with plain momentum (as in the reference). SGDNesterov is the true Nesterov variant.")
    own_schedule = False
    if spec.kind == "adafactor":
        own_schedule = _adafactor_lr(kwargs, groups, lr, notes)
    else:
        kwargs["lr"] = lr
    if spec.kind == "lr_near_one":
        _check_adaptive_lr(canonical, groups, lr, notes)
    step_kind = _multi_tensor_step(cls, accepted, kwargs, groups, device)
    optimizer = _construct(canonical, cls, groups, kwargs, network)
    info = OptimizerInfo(optimizer, canonical, kwargs, notes, is_schedule_free=spec.kind == "schedule_free",
                         uses_own_schedule=own_schedule, lr=lr, step_kind=step_kind)
    optimizer_train_mode(info)
    return info


def optimizer_train_mode(info: OptimizerInfo) -> None:
    """Put a schedule-free optimizer in train mode (the weights it steps on); others need nothing."""
    if info.is_schedule_free:
        info.optimizer.train()


def optimizer_eval_mode(info: OptimizerInfo) -> None:
    """Put a schedule-free optimizer in eval mode before saving weights; others need nothing.

    Schedule-free methods step on one sequence of weights and keep an average of them; the average
    (what eval mode puts in the parameters) is the model to keep. To resume, save the weights and the
    optimizer state in the same mode (both here, or both after `optimizer_train_mode`).
    """
    if info.is_schedule_free:
        info.optimizer.eval()
