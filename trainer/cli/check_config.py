"""``python -m trainer check-config FILE``: parse and validate a settings JSON."""

from __future__ import annotations

import sys

from trainer.config import ConfigError, TrainConfig, describe, read_settings_json
from trainer.config.checks import run_problems


def check_config_command(path: str) -> int:
    """``check-config FILE``: print the parsed settings and return 0, or every problem and 2."""
    try:
        data = read_settings_json(path)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        config = TrainConfig.from_dict(data)
    except ConfigError as error:
        print(f"{path}: {len(error.problems)} problem(s):", file=sys.stderr)
        for problem in error.problems:
            print(f"  {problem}", file=sys.stderr)
        for warning in error.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        return 2
    print(f"{path}: valid settings")
    for line in describe(config):
        print(f"  {line}")
    for warning in config.warnings:
        print(f"warning: {warning}")
    for need in run_problems(config):
        print(f"before training: {need}")
    return 0
