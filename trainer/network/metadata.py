"""The safetensors header of a saved network: kohya ``ss_*`` keys, ``modelspec.*`` keys and the
full TrainTrain config (SPEC §6.5). Every value is a string.

Changes from the reference, on purpose:
- ``ss_network_module`` says what the file is: ``networks.lora`` for lierla/c3lier and
  ``lycoris.kohya`` (with ``"algo": "loha"`` in ``ss_network_args``) for LoHa, as sd-scripts and
  LyCORIS write it, instead of the reference's ``network.lora`` for everything.
- ``ss_training_started_at`` is the real start of training, passed in by the caller.
- ``ss_network_dim``/``ss_network_alpha`` (and ``conv_dim``/``conv_alpha``) describe the tensors
  saved, read from the live network: a run started from a file (``network_resume``) keeps the
  file's ranks whatever ``network_rank`` says (``Dynamic`` when modules differ, as sd-scripts'
  resize writes it); ``traintrain_network_modules`` (+ ``_unet_``/``_te_``) count the modules.
- ``ss_steps`` is the optimizer-step count of this save; ``ss_tag_frequency`` is sd-scripts'
  ``{"<dataset folder name>": {tag: count}}`` (the reference wrote ``{"1": ...}``).
- ``modelspec.*`` keys (Stability AI model spec, as sd-scripts writes them) and
  ``traintrain_config`` (the settings as JSON) are added; the ``sshs_*`` hashes are added by
  ``io.save_network`` from the final tensors.
"""

from __future__ import annotations

import datetime
import json
import random
from typing import Any, Mapping

_REQUIRED_TRAINING = ("ss_training_started_at", "ss_output_name")

# ss_* key -> reference JSON key of the value (SPEC §6.5).
_FROM_CONFIG = {
    "ss_learning_rate": "train_learning_rate",
    "ss_unet_lr": "train_learning_rate",
    "ss_max_train_steps": "train_iterations",
    "ss_lr_warmup_steps": "train_lr_warmup_steps",
    "ss_lr_scheduler": "train_lr_scheduler",
    "ss_lr_step_rules": "train_lr_step_rules",
    "ss_lr_scheduler_num_cycles": "train_lr_scheduler_num_cycles",
    "ss_lr_scheduler_power": "train_lr_scheduler_power",
    "ss_min_snr_gamma": "train_snr_gamma",
    "ss_seed": "train_seed",
}

# base_model_hash_info key -> ss_* key (sd-scripts' names for the base checkpoint). Only these are
# read: a checkpoint's own header may hold the ss_* keys of its training, which must not leak in.
_BASE_MODEL_KEYS = {"name": "ss_sd_model_name", "hash": "ss_sd_model_hash", "sha256": "ss_new_sd_model_hash"}
_BASE_MODEL_KEYS.update({v: v for v in list(_BASE_MODEL_KEYS.values())})


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return "" if value is None else str(value)


def _network_fields(spec: Any) -> dict[str, str]:
    conv = {"conv_dim": str(spec.conv_rank or spec.rank), "conv_alpha": str(spec.conv_alpha or spec.alpha)}
    fields = {"ss_network_module": "networks.lora", "ss_network_dim": str(spec.rank),
              "ss_network_alpha": str(spec.alpha)}
    if spec.network_type == "c3lier":
        fields["ss_network_args"] = json.dumps(conv)
    elif spec.network_type == "loha":
        fields["ss_network_module"] = "lycoris.kohya"
        fields["ss_network_args"] = json.dumps({"algo": "loha", **conv, "use_tucker": "True"})
    return fields


def _one_or_dynamic(values: list) -> str:
    """The common value of ``values``, or ``Dynamic`` (as sd-scripts' resize_lora writes it) when
    the modules differ."""
    distinct = sorted(set(values))
    return str(distinct[0]) if len(distinct) == 1 else "Dynamic"


def _live_network_fields(network: Any) -> dict[str, str]:
    """The network fields read from the modules that are saved, not from the requested settings:
    a network started from a file (``network_resume``) keeps the file's ranks and alphas."""
    from trainer.network.layers import is_kxk_conv

    modules = list(network.all_modules)
    if not modules:
        raise ValueError("the network has no modules; there is nothing to describe")
    plain = [m for m in modules if not is_kxk_conv(m.org_module)]
    conv = [m for m in modules if is_kxk_conv(m.org_module)]
    base = plain or conv
    fields = {"ss_network_module": "networks.lora",
              "ss_network_dim": _one_or_dynamic([m.rank for m in base]),
              "ss_network_alpha": _one_or_dynamic([float(m.alpha.float().item()) for m in base]),
              "ss_network_train_unet_only": str(not network.te_modules),
              "traintrain_network_modules": str(len(modules)),
              "traintrain_network_unet_modules": str(len(network.unet_modules)),
              "traintrain_network_te_modules": str(len(network.te_modules))}
    args = {}
    if conv:
        args = {"conv_dim": _one_or_dynamic([m.rank for m in conv]),
                "conv_alpha": _one_or_dynamic([float(m.alpha.float().item()) for m in conv])}
    if network.spec.network_type == "loha":
        fields["ss_network_module"] = "lycoris.kohya"
        fields["ss_network_args"] = json.dumps({"algo": "loha", **args, "use_tucker": "True"})
    elif args:
        fields["ss_network_args"] = json.dumps(args)
    params = list(network.parameters())
    fields["ss_mixed_precision"] = str(params[0].dtype if params else network.spec.dtype)
    return fields


def _modelspec(family: Any, config: Any, title: str, started: float,
               prediction_type: str | None = None) -> dict[str, str]:
    if prediction_type is not None:  # what the loaded model really predicts (a v-pred SD2 checkpoint)
        v_pred = prediction_type == "v_prediction"
    else:
        v_pred = config.model_v_pred or family.default_prediction == "v_prediction"
    height, width = config.image_size
    spec = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.modelspec_arch(v_pred),
        "modelspec.implementation": family.modelspec_implementation,
        "modelspec.title": title,
        "modelspec.date": datetime.datetime.fromtimestamp(int(started)).isoformat(),
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
    }
    if getattr(family, "flow", False):  # flow-matching families: sd-scripts writes no prediction type
        del spec["modelspec.prediction_type"]
    return spec


def _tag_frequency(value: Any) -> str:
    """The reference writes ``{"1": {tag: count}}``; a flat ``{tag: count}`` is wrapped that way."""
    if isinstance(value, dict) and value and all(isinstance(v, int) for v in value.values()):
        value = {"1": value}
    return _text(value if value is not None else {})


def build_metadata(*, config: Any, family: Any, network_spec: Any = None,
                   base_model_hash_info: Mapping[str, Any] | None, training_info: Mapping[str, Any],
                   network: Any = None, prediction_type: str | None = None) -> dict[str, str]:
    """The header of a saved network (all values strings), without the ``sshs_*`` hashes.

    Args:
        config: the run's ``TrainConfig``: typed values are read from its attributes, and the
            ``ss_*`` copies of settings and ``traintrain_config`` from ``to_dict()`` (the
            reference's JSON form, as the settings file says them).
        family: the model ``Family``.
        network_spec: the ``NetworkSpec`` the network was built with (when no ``network`` is given).
        network: the live ``Network`` being saved; when given, rank, alpha, conv rank/alpha, module
            counts and dtype are read from its modules (what the file really holds), and
            ``network_spec`` is not needed.
        prediction_type: the trained model's ``"epsilon"`` or ``"v_prediction"`` (the bundle's);
            when None it is guessed from ``model_v_pred`` and the family.
        base_model_hash_info: about the base checkpoint: ``name``, ``hash`` (A1111's short hash) and
            ``sha256`` (or the same under ``ss_sd_model_name``, ``ss_sd_model_hash``,
            ``ss_new_sd_model_hash``); every other key is ignored.
        training_info: header entries of this save, written as given (dicts as JSON). Must hold
            ``ss_training_started_at`` (Unix time the training started) and ``ss_output_name``; usual
            others are ``ss_seed`` (the resolved seed), ``ss_steps``, ``ss_tag_frequency``.
    """
    missing = [k for k in _REQUIRED_TRAINING if k not in training_info]
    if missing:
        raise ValueError(f"training_info lacks {missing}; build_metadata needs the start time and output name")
    try:
        started = float(training_info["ss_training_started_at"])
    except (TypeError, ValueError):
        raise ValueError(f"training_info ss_training_started_at is {training_info['ss_training_started_at']!r}; "
                         "it must be a Unix time in seconds") from None
    config_dict = config.to_dict()
    meta = {"ss_session_id": str(random.randint(0, 2**31 - 1))}
    for key, config_key in _FROM_CONFIG.items():
        meta[key] = _text(config_dict.get(config_key, ""))
    te_lr = config.train_textencoder_learning_rate
    meta["ss_text_encoder_lr"] = meta["ss_learning_rate"] if te_lr is None else _text(config_dict[
        "train_textencoder_learning_rate"])
    meta["ss_optimizer"] = config.train_optimizer.lower()
    if network is not None:
        meta.update(_live_network_fields(network))
    elif network_spec is not None:
        meta.update(_network_fields(network_spec))
        meta["ss_mixed_precision"] = str(network_spec.dtype)
    else:
        raise ValueError("build_metadata needs the network (or its NetworkSpec)")
    meta["ss_v2"] = str(bool(family.is_v2))
    meta["ss_base_model_version"] = family.base_model_version
    meta["ss_resolution"] = str(tuple(config.image_size))
    meta["ss_tag_frequency"] = _tag_frequency(training_info.get("ss_tag_frequency"))
    for key, value in (base_model_hash_info or {}).items():
        target = _BASE_MODEL_KEYS.get(key)
        if target and value not in (None, ""):
            meta[target] = _text(value)
    meta.update({k: _text(v) for k, v in training_info.items() if k != "ss_tag_frequency"})
    meta.update(_modelspec(family, config, meta["ss_output_name"], started, prediction_type))
    meta["traintrain_config"] = json.dumps(dict(config_dict), ensure_ascii=False, default=str)
    return meta
