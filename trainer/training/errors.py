"""What went wrong with a run, in two kinds: bad input found before training (a setting, file,
folder, lock or stopped state to fix; nothing was changed) and a fault during the run.

The CLI maps the kinds to exit codes (``trainer/cli/train.py``); the queue and the page use
them to say bad input in one line and to keep the traceback of a fault.
"""

from __future__ import annotations


class JobError(RuntimeError):
    """A job could not start or finish; the message says what to change."""


class InputError(JobError):
    """A setting, file or folder that stops the run before training; nothing was changed."""


def is_input_error(exc: BaseException) -> bool:
    """True for bad input found before training: settings, files, folders, locks, the stopped run's state."""
    from trainer.config import ConfigError
    from trainer.data.errors import DataError
    from trainer.hosts.base import ModelLoadError
    from trainer.training.runlog import StateError

    return isinstance(exc, (ConfigError, DataError, InputError, StateError, ModelLoadError))


def failure_text(exc: BaseException) -> str:
    """One line for the user: the message of the trainer's own errors, the type and message of any other."""
    from trainer.training.loop import SaveFailed, TrainingOutOfMemory

    if is_input_error(exc) or isinstance(exc, (JobError, SaveFailed, TrainingOutOfMemory)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
