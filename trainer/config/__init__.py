"""The settings of a run: what each one is (schema.py: PARAMS, the single list of parameters),
how a value is read and what a bad one is told (values.py), the checks across settings and
before a run (checks.py), the exact enumeration strings (choices.py), and TrainConfig, the
settings of one run, read from and written to the reference's JSON (settings.py).

The names most callers need are importable from here: ``from trainer.config import TrainConfig``.
"""

from trainer.config.schema import OPTIMIZER_ALIASES, PARAMS, Param, param, params_for_mode
from trainer.config.settings import TrainConfig, describe, read_settings_json
from trainer.config.values import ConfigError, parse_step_rules

__all__ = [
    "ConfigError", "OPTIMIZER_ALIASES", "PARAMS", "Param", "TrainConfig", "describe", "param", "params_for_mode",
    "parse_step_rules", "read_settings_json",
]
