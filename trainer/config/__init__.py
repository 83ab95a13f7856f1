"""The settings of a run: what each one is (schema.py: PARAMS, the single list of parameters),
how a value is read and what a bad one is told (values.py), the checks across settings and
before a run (checks.py), the exact enumeration strings (choices.py), and TrainConfig, the
settings of one run, read from and written to the reference's JSON (settings.py).

The names most callers need are importable from here: ``from trainer.config import TrainConfig``.
They are loaded on first use (PEP 562), so that reading the leaf ``trainer.config.choices`` (as
``modes`` and ``network`` do) does not pull in ``settings``, which itself reads the mode registry.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "OPTIMIZER_ALIASES": "schema", "PARAMS": "schema", "Param": "schema", "param": "schema",
    "params_for_mode": "schema", "TrainConfig": "settings", "describe": "settings",
    "read_settings_json": "settings", "ConfigError": "values", "parse_step_rules": "values",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'trainer.config' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"trainer.config.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
