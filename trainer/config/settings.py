"""TrainConfig: every setting of a run, typed and validated, read from and written to the
reference product's settings JSON (SPEC.md §3.5).

The parameters themselves are listed once, in ``schema.PARAMS``; this module holds the
values of one run. A TrainConfig is immutable and always valid: building one (from keywords,
``from_dict``, ``from_json``, ``replace`` or ``with_override``) converts and checks every value
and raises ``ConfigError`` listing all problems at once. ``check_for_run()`` adds what the chosen
mode needs (folders, prompts, images) before a run starts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from trainer.config.checks import coerce_params, cross_checks, mode_checks, run_problems
from trainer.config.schema import (
    EXTENSION_PARAMS, EXTRA_KEYS, IGNORED_KEYS, PARAMS, REFERENCE_PARAMS, find_param, param, suggest,
)
from trainer.config.values import ConfigError, display, show, to_raw
from trainer.modes import all_modes, get_mode

_TEXT_FIELDS = ("model", "vae", "te", "original_prompt", "target_prompt", "negative_prompt",
                "original_image", "target_image")
_PARAM_NAMES = frozenset(p.name for p in PARAMS)
_KEY_OF_EXTRA = {attr: key for key, attr in EXTRA_KEYS.items()}


class TrainConfig:
    """The settings of one run: an attribute per ``Param`` plus mode, model, prompts and images.

    Keyword arguments are attribute names; values may be typed (``network_rank=16``) or in the
    JSON/UI form (``network_rank="16"``). ``second_pass`` (Difference only) holds the 2nd-pass
    panel as another TrainConfig, or a dict of its JSON values whose missing keys take this
    config's values. ``warnings`` lists what was accepted but deserves a look (unknown keys,
    settings without effect); it is not saved and not compared.
    """

    # The attributes, typed for readers and type checkers. Generated from schema.PARAMS
    # (schema.annotation_lines); tests/test_config.py fails when they differ, and shows the block.
    # --- begin generated attributes ---
    network_type: Literal['lierla', 'c3lier', 'loha']
    network_rank: int
    network_alpha: float
    lora_data_directory: str
    diff_target_name: str
    lora_trigger_word: str
    image_size: tuple[int, int]
    train_iterations: int
    train_batch_size: int
    train_learning_rate: float
    train_optimizer: Literal[
        'AdamW', 'AdamW8bit', 'AdaFactor', 'Lion', 'Prodigy', 'DadaptAdam', 'DadaptLion', 'DAdaptAdaGrad',
        'DAdaptAdan', 'DAdaptSGD', 'Adam8bit', 'SGDNesterov8bit', 'Lion8bit', 'PagedAdamW8bit',
        'PagedLion8bit', 'RAdamScheduleFree', 'AdamWScheduleFree', 'SGDScheduleFree', 'CAME', 'Tiger',
        'AdamMini', 'PagedAdamW', 'PagedAdamW32bit', 'SGDNesterov', 'Adam',
    ]
    train_optimizer_settings: str
    train_lr_scheduler: Literal[
        'cosine_annealing', 'cosine_annealing_with_restarts', 'linear', 'cosine', 'cosine_with_restarts',
        'polynomial', 'constant', 'constant_with_warmup', 'piecewise_constant', 'exponential', 'step',
        'multi_step', 'reduce_on_plateau', 'cyclic', 'one_cycle',
    ]
    train_lr_scheduler_settings: str
    save_lora_name: str
    use_gradient_checkpointing: bool
    network_blocks: list[str]
    network_resume: str
    network_strength: float
    network_conv_rank: int
    network_conv_alpha: float
    network_element: Literal['Full', 'CrossAttention', 'SelfAttention']
    network_train_text_encoder: bool
    image_buckets_step: int
    image_num_multiply: int
    image_min_length: int
    image_max_ratio: float
    sub_image_num: int
    image_mirroring: bool
    image_use_filename_as_tag: bool
    image_disable_upscale: bool
    train_fixed_timsteps_in_batch: bool
    train_textencoder_learning_rate: float | None
    train_seed: int
    train_min_timesteps: int
    train_max_timesteps: int
    train_loss_function: Literal['MSE', 'L1', 'Smooth-L1']
    train_lr_step_rules: str
    train_lr_warmup_steps: int
    train_lr_scheduler_num_cycles: int
    train_lr_scheduler_power: float
    train_snr_gamma: float
    save_per_steps: int
    diff_alt_ratio: float
    diff_revert_original_target: bool
    diff_use_diff_mask: bool
    train_model_precision: Literal['model', 'fp32', 'bf16', 'fp16', 'int8']
    train_lora_precision: Literal['fp32', 'bf16', 'fp16']
    save_precision: Literal['model', 'fp32', 'bf16', 'fp16']
    train_VAE_precision: Literal['fp32', 'bf16', 'fp16']
    diff_load_1st_pass: str
    diff_save_1st_pass: bool
    diff_1st_pass_only: bool
    logging_save_csv: bool
    logging_verbose: bool
    save_overwrite: bool
    save_as_json: bool
    model_v_pred: bool
    use_2nd_pass_settings: bool
    gradient_accumulation_steps: int
    train_noise_offset: float
    train_max_grad_norm: float
    cache_latents_to_disk: bool
    addift_timestep_schedule: Literal['fixed', 'random']
    zero_terminal_snr: bool
    ileco_latents: Literal['noise', 'trajectory']
    clip_skip: int
    embeddings_dir: str
    preview_prompts: str
    preview_every_steps: int
    preview_seed: int
    preview_size: tuple[int, int]
    preview_steps: int
    host_check: bool
    memory_profile: Literal['speed', 'balanced', 'low', 'auto']
    compile_unet: bool
    # --- end generated attributes ---
    mode: str
    model: str
    vae: str
    te: str
    original_prompt: str
    target_prompt: str
    negative_prompt: str
    original_image: str
    target_image: str
    second_pass: TrainConfig | None
    warnings: list[str]

    def __init__(self, *, mode: str = "LoRA", second_pass: TrainConfig | dict | None = None,
                 warnings: list[str] | None = None, **values: object):
        unknown = sorted(set(values) - _PARAM_NAMES - set(_TEXT_FIELDS))
        if unknown:
            raise ConfigError([f"{name}: not a setting{suggest(name)}" for name in unknown])
        params = {k: v for k, v in values.items() if k in _PARAM_NAMES}
        typed, problems, found, failed = coerce_params(params)
        mode = _coerce_mode(mode, problems)
        texts = {name: _coerce_text(name, values.get(name), problems) for name in _TEXT_FIELDS}
        more_problems, more_warnings = cross_checks(typed, failed)
        problems += more_problems + mode_checks(mode, typed, failed)
        found += more_warnings
        second = None
        if get_mode(mode).has_second_pass:
            # Missing 2nd-pass keys take this pass's values, unless those are wrong themselves
            # (then defaults, so one mistake is reported once).
            second = _second_pass(mode, second_pass, {} if problems else typed, problems, found)
        elif second_pass:
            users = " and ".join(m.name for m in all_modes() if m.has_second_pass)
            found.append(f"2nd pass: only {users} mode uses it; ignored in {mode} mode")
        if problems:
            raise ConfigError(problems, list(warnings or []) + found)
        for name, value in {**typed, **texts, "mode": mode, "second_pass": second}.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_source_warnings", list(warnings or []))
        object.__setattr__(self, "warnings", list(warnings or []) + found)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"TrainConfig is immutable; use config.replace({name}=...) instead")

    def _fields(self) -> dict[str, object]:
        """Every compared value: parameters, mode, texts and the 2nd pass (not warnings)."""
        fields = {p.name: getattr(self, p.name) for p in PARAMS}
        fields.update({name: getattr(self, name) for name in _TEXT_FIELDS})
        fields.update(mode=self.mode, second_pass=self.second_pass)
        return fields

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TrainConfig):
            return NotImplemented
        return self._fields() == other._fields()

    __hash__ = None  # holds a list (network_blocks), like a dataclass with eq=True

    def __repr__(self) -> str:
        changed = [f"{name}={value!r}" for name, value in self._fields().items()
                   if name in _PARAM_NAMES and value != _default(name)
                   or name in _TEXT_FIELDS and value or name == "second_pass" and value is not None]
        return f"TrainConfig(mode={self.mode!r}{''.join(', ' + c for c in changed)})"

    # --- reading and writing -------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """Build from a settings dict in the reference format (JSON keys or attribute names).

        Missing keys take defaults, values are converted tolerantly, keys the reference ignores
        are accepted quietly and other unknown keys are named in ``warnings``.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"settings must be a JSON object {{...}}, not {type(data).__name__}")
        values, warnings, problems = _map_keys(data, allow_extras=True)
        if problems:
            raise ConfigError(problems, warnings)
        return cls(warnings=warnings, **values)  # its ConfigError carries these warnings too

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> TrainConfig:
        """Read a settings JSON file; ConfigError for a missing file, bad JSON or bad values."""
        return cls.from_dict(read_settings_json(path))

    def to_dict(self) -> dict[str, object]:
        """The reference's settings format: the 59 keys in table order with UI-style values,
        "2nd pass" (Difference), mode/model/vae/te/prompts, then this project's keys."""
        data: dict[str, object] = {p.key: to_raw(p, getattr(self, p.name)) for p in REFERENCE_PARAMS}
        if self.second_pass is not None:  # only a mode with a 2nd pass keeps one
            data["2nd pass"] = self.second_pass._params_dict()
        data.update({"mode": self.mode, "model": self.model, "vae": self.vae, "te": self.te,
                     "original prompt": self.original_prompt, "target prompt": self.target_prompt})
        data.update({p.key: to_raw(p, getattr(self, p.name)) for p in EXTENSION_PARAMS})
        for name in ("negative_prompt", "original_image", "target_image"):
            if getattr(self, name):
                data[_KEY_OF_EXTRA[name]] = getattr(self, name)
        return data

    def _params_dict(self) -> dict[str, object]:
        return {p.key: to_raw(p, getattr(self, p.name)) for p in PARAMS}

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write ``to_dict()`` as UTF-8 JSON with indent 4; the file is replaced atomically."""
        from trainer.atomic import write_text

        return write_text(path, json.dumps(self.to_dict(), indent=4, ensure_ascii=False) + "\n")

    # --- derived configs -----------------------------------------------------------------

    def replace(self, **changes: object) -> TrainConfig:
        """A new, validated config with some values changed (attribute names)."""
        values = {**self._fields(), **changes}
        return TrainConfig(warnings=self._source_warnings, **values)

    def with_override(self, assignment: str) -> TrainConfig:
        """Apply one ``KEY=VALUE`` text (the CLI's ``--set``); KEY is a JSON key or attribute name."""
        key, sep, text = assignment.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {show(assignment)}: write KEY=VALUE, e.g. network_rank=8")
        found = find_param(key)
        name = found.name if found else EXTRA_KEYS.get(key, key if key in _TEXT_FIELDS + ("mode",) else None)
        if name is None or name == "second_pass":
            raise ConfigError(f"--set {show(assignment)}: {key!r} is not a setting{suggest(key)}")
        return self.replace(**{name: text})

    def pass2(self) -> TrainConfig:
        """The effective settings of Difference pass 2 (SPEC.md §3.4).

        With use_2nd_pass_settings on and a 2nd pass present, every setting of the 2nd-pass
        panel takes its 2nd-pass value and the rest keep this config's values; otherwise the
        values are this config's. The result has no 2nd pass of its own.
        """
        values = {**self._fields(), "second_pass": None}
        if self.use_2nd_pass_settings and self.second_pass is not None:
            for p in PARAMS:
                if p.second_pass and p.name != "use_2nd_pass_settings":
                    values[p.name] = getattr(self.second_pass, p.name)
        return TrainConfig(**values)

    def check_for_run(self) -> None:
        """Raise ConfigError naming everything this mode still needs (folder, prompt, images)."""
        problems = run_problems(self)
        if problems:
            raise ConfigError(problems)

    def param_values(self) -> dict[str, object]:
        """Attribute name -> typed value for every parameter, in table order."""
        return {p.name: getattr(self, p.name) for p in PARAMS}


def _default(name: str) -> object:
    p = param(name)
    return list(p.default) if p.kind == "blocks" else p.default


_BLANK = (None, "")


def _coerce_mode(mode: object, problems: list[str]) -> str:
    """A registered mode's name, matched case-insensitively; blank means LoRA."""
    if mode in _BLANK:
        return "LoRA"
    names = [m.name for m in all_modes()]
    folded = {name.lower(): name for name in names}
    if isinstance(mode, str) and mode.strip().lower() in folded:
        return folded[mode.strip().lower()]
    problems.append(f"mode: {show(mode)} is not a known mode; choose one of {', '.join(names)}")
    return "LoRA"


def _coerce_text(name: str, value: object, problems: list[str]) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        problems.append(f"{_KEY_OF_EXTRA[name]}: {show(value)} is not allowed; use text")
        return ""
    # The UI's dropdowns offer "None" for "no separate VAE / text encoder".
    if name in ("vae", "te") and value.strip().lower() == "none":
        return ""
    return value


def _second_pass(mode: str, value: object, typed: dict, problems: list[str],
                 warnings: list[str]) -> TrainConfig | None:
    """Build the 2nd-pass panel; its problems and warnings are prefixed with '2nd pass: '."""
    if value is None or isinstance(value, TrainConfig):
        return value
    if not isinstance(value, dict):
        problems.append(f"2nd pass: {show(value)} is not allowed; use an object of settings {{...}}")
        return None
    if not value:
        return None
    values, found, key_problems = _map_keys(value, allow_extras=False)
    warnings.extend(f"2nd pass: {w}" for w in found)
    try:
        second = TrainConfig(mode=mode, **{**typed, **values})
    except ConfigError as error:
        problems.extend(f"2nd pass: {p}" for p in key_problems + error.problems)
        return None
    problems.extend(f"2nd pass: {p}" for p in key_problems)
    warnings.extend(f"2nd pass: {w}" for w in second.warnings)
    return second


def _map_keys(data: dict, allow_extras: bool) -> tuple[dict[str, object], list[str], list[str]]:
    """JSON keys / attribute names -> attribute names. Returns (values, warnings, problems)."""
    values: dict[str, object] = {}
    warnings: list[str] = []
    problems: list[str] = []
    for key, value in data.items():
        found = find_param(key)
        if found is not None:
            name = found.name
        elif allow_extras and (key in EXTRA_KEYS or key in _KEY_OF_EXTRA or key == "mode"):
            name = EXTRA_KEYS.get(key, key)
        elif key in IGNORED_KEYS:
            continue
        else:
            warnings.append(f"unknown key {key!r} ignored{suggest(key)}")
            continue
        if name in values:
            problems.append(f"{key}: given twice (as JSON key and as attribute name); keep one")
        values[name] = value
    return values, warnings, problems


def read_settings_json(path: str | os.PathLike) -> dict:
    """Load a settings file as a dict, with a one-line ConfigError for each way it can fail."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: file not found")
    if not path.is_file():
        raise ConfigError(f"{path}: is a folder, not a settings JSON file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start}); save it as UTF-8") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot be read ({error.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: "
                          f"{error.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object {{...}} of settings, "
                          f"not {type(data).__name__}")
    return data


def describe(config: TrainConfig) -> list[str]:
    """Lines 'key: value' for every parameter, then mode, model, prompts and images."""
    lines = [f"{p.key}: {display(p, getattr(config, p.name))}" for p in PARAMS]
    lines.append(f"mode: {config.mode}")
    for name in _TEXT_FIELDS:
        lines.append(f"{_KEY_OF_EXTRA.get(name, name)}: {show(getattr(config, name))}")
    if config.second_pass is not None:
        second, state = config.second_pass, "used" if config.use_2nd_pass_settings else "not used"
        differing = [f"{p.key} = {display(p, getattr(second, p.name))}" for p in PARAMS
                     if p.second_pass and p.name != "use_2nd_pass_settings"
                     and getattr(second, p.name) != getattr(config, p.name)]
        lines.append(f"2nd pass ({state}): {', '.join(differing) or 'same values as pass 1'}")
    return lines
