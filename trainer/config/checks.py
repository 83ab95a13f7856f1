"""Checks of settings beyond each value's type: ranges that depend on other settings,
settings strings, file-name rules, and what each mode needs before it can run.

Each function returns lists of messages instead of raising, so the caller can report every
problem of a file at once (``ConfigError`` with all of them).
"""

from __future__ import annotations

import re

from trainer.config.schema import PARAMS, param
from trainer.config.values import ConfigError, fmt_number, parse_step_rules, show, to_typed
from trainer.training.optim.settings import OptimizerSettingsError, parse_settings

# The reference silently turns values <= 0 of these into 1 (SPEC.md §3.2); we do the same so its
# files keep loading, but say so.
_LE_ZERO_FALLBACK = {"train_lr_scheduler_num_cycles": 1, "train_lr_scheduler_power": 1.0}
_BAD_NAME_CHARS = re.compile(r'[<>:"/\\|?*\x00-\x1f]')


def coerce_params(raw: dict[str, object]) -> tuple[dict[str, object], list[str], list[str], set[str]]:
    """Typed value of every parameter from attribute-name -> raw value (missing = default).

    Returns (values, problems, warnings, failed names); a value with a problem gets its default
    so the other checks can still run.
    """
    values, problems, warnings, failed = {}, [], [], set()
    for p in PARAMS:
        value = raw.get(p.name)
        try:
            value = _fallback(p.name, value, warnings)
            _special_value_checks(p.name, value)
            values[p.name] = to_typed(p, value)
        except ConfigError as error:
            problems.extend(error.problems)
            failed.add(p.name)
            values[p.name] = list(p.default) if p.kind == "blocks" else p.default
    return values, problems, warnings, failed


def _fallback(name: str, value: object, warnings: list[str]) -> object:
    if name not in _LE_ZERO_FALLBACK or value is None:
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value
    if number <= 0:
        replacement = _LE_ZERO_FALLBACK[name]
        warnings.append(f"{param(name).key}: {show(value)} is not above 0; "
                        f"{fmt_number(replacement)} is used, as in the reference")
        return replacement
    return value


def _special_value_checks(name: str, value: object) -> None:
    """Checks whose message must say more than the generic range text."""
    if name not in ("image_buckets_step", "image_min_length") or value is None:
        return
    key = param(name).key
    try:
        number = float(value)
    except (TypeError, ValueError):
        return  # the generic check reports it
    if name == "image_buckets_step" and number == 0:
        raise ConfigError(f"{key}: {show(value)} is not allowed; a step of 0 would make bucket "
                          f"generation loop forever; use a multiple of 8 such as 64, 128 or 256")
    if number > 0 and number % 8:
        raise ConfigError(f"{key}: {show(value)} is not allowed; use a multiple of 8 pixels "
                          f"(the VAE works on 8x8-pixel cells), e.g. 64, 128 or 256")


def cross_checks(v: dict[str, object], failed: set[str] = frozenset()) -> tuple[list[str], list[str]]:
    """Problems and warnings that involve more than one value (v: attribute name -> typed value).

    A check is skipped when a value it reads already failed (``failed``), so a wrong value is
    not reported twice and a default standing in for it raises no false alarm.
    """
    problems: list[str] = []
    warnings: list[str] = []

    def ok(*names: str) -> bool:
        return not failed.intersection(names)

    if ok("train_min_timesteps", "train_max_timesteps") and v["train_min_timesteps"] >= v["train_max_timesteps"]:
        problems.append(f"train_min_timesteps ({v['train_min_timesteps']}) must be lower than "
                        f"train_max_timesteps ({v['train_max_timesteps']}); the trained timesteps "
                        f"are min <= t < max")
    if ok("train_learning_rate") and v["train_learning_rate"] <= 0:
        problems.append(f"train_learning_rate: {show(fmt_number(v['train_learning_rate']))} is not "
                        f"allowed; use a positive number such as 1e-4 (about 1.0 for Prodigy/DAdapt)")
    if ok("network_type", "network_strength", "network_element"):
        _network_checks(v, problems, warnings)
    _text_checks(v, problems)
    if ok("train_iterations", "train_lr_warmup_steps", "save_per_steps"):
        _schedule_warnings(v, warnings)
    return problems, warnings


def mode_checks(mode: str, v: dict[str, object], failed: set[str] = frozenset()) -> list[str]:
    """Problems of values that depend on the mode: a text encoder the mode would train but no file can
    hold (Z-Image's QWEN3 in a mode that trains text encoders)."""
    from trainer.families import QWEN3_NOT_TRAINED
    from trainer.modes import get_mode

    if "network_blocks" in failed or "QWEN3" not in v["network_blocks"]:
        return []
    try:
        trains = get_mode(mode).text_encoder
    except KeyError:  # an unknown mode is reported by its own check
        return []
    return [QWEN3_NOT_TRAINED] if trains else []


def _network_checks(v: dict, problems: list[str], warnings: list[str]) -> None:
    strength = v["network_strength"]
    if v["network_type"] == "loha":
        if strength != 1:
            warnings.append(f"network_strength ({fmt_number(strength)}) has no effect on loha networks")
        if v["network_element"] != "Full":
            warnings.append(f"network_element ({v['network_element']}) has no effect on loha networks; "
                            f"all selected layers are trained")
    elif strength <= 0:
        problems.append(f"network_strength: {show(fmt_number(strength))} is not allowed; use a number "
                        f"> 0 (it scales the saved weights by its square root); to invert the "
                        f"effect, use a negative weight when applying the file")


def _text_checks(v: dict, problems: list[str]) -> None:
    name = v["save_lora_name"]
    if _BAD_NAME_CHARS.search(name) or name.strip() in (".", "..") or name != name.strip():
        problems.append(f"save_lora_name: {show(name)} is not allowed; it becomes a file name, so use "
                        f"no folder separators, none of < > : \" | ? * and no leading/trailing spaces")
    suffix = v["diff_target_name"]
    if _BAD_NAME_CHARS.search(suffix):
        problems.append(f"diff_target_name: {show(suffix)} is not allowed; it is a file-name suffix "
                        f"such as \"_closed_eyes\", without folder separators or < > : \" | ? *")
    # The optimizer factory's own reader, so a file that passes here is read the same way there.
    for key in ("train_optimizer_settings", "train_lr_scheduler_settings"):
        try:
            parse_settings(v[key], field=key)
        except OptimizerSettingsError as error:
            # Start with the bare key like every other problem of a settings file.
            problems.append(str(error).replace(f"`{key}`", key, 1))
    if v["train_lr_step_rules"].strip():
        try:
            parse_step_rules(v["train_lr_step_rules"])
        except ConfigError as error:
            problems.extend(error.problems)


def _schedule_warnings(v: dict, warnings: list[str]) -> None:
    steps = v["train_iterations"]
    if v["train_lr_warmup_steps"] >= steps:
        warnings.append(f"train_lr_warmup_steps ({v['train_lr_warmup_steps']}) is not below "
                        f"train_iterations ({steps}): the learning rate never reaches its set value")
    if v["save_per_steps"] >= steps:
        warnings.append(f"save_per_steps ({v['save_per_steps']}) is not below train_iterations "
                        f"({steps}): no intermediate file will be saved")


def run_problems(config) -> list[str]:
    """What ``config.mode`` needs set before a run can start (files are checked later, on use)."""
    from trainer.modes import get_mode

    problems = get_mode(config.mode).run_problems(config)
    problems.extend(package_problems(config))
    return problems


def package_problems(config) -> list[str]:
    """Optional packages the chosen network type and optimizer need but this Python lacks (or has too old)."""
    from trainer.compat import network_type_problem
    from trainer.training.optim.optimizers import availability_problem

    found = []
    network = network_type_problem(config.network_type)
    if network:
        found.append(f"network_type {config.network_type}: {network}")
    passes = [config] + ([config.second_pass] if config.second_pass is not None
                         and config.use_2nd_pass_settings else [])
    for name in dict.fromkeys(p.train_optimizer for p in passes):
        try:
            optimizer = availability_problem(name)
        except ValueError:  # an unknown name is reported by the value checks
            continue
        if optimizer:
            found.append(optimizer)
    return found
