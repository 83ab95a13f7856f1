"""Settings strings of the optimizer and the LR scheduler, and the checks on their keyword names.

The two text fields `train_optimizer_settings` and `train_lr_scheduler_settings` hold extra keyword
arguments as `name=value` lines (SPEC.md §3.3). The reading rules are the reference's: every space is
removed, `;` counts as a line break, each line is split at its first `=`, and the value is read as a
Python literal with `ast.literal_eval`.

Where the reference silently drops what it cannot read, this module raises `OptimizerSettingsError`
naming the field, the line and an example of the right form:
- a non-blank line without `=`;
- an empty name, a name that is not a Python identifier, or a name given twice;
- an empty value, or a value that is neither a literal nor a bare word (below).

Bare words. A value that is not a literal but is one word (`triangular2`, `cos`, `min`) is taken as that
string, so `mode=triangular2` works without quotes; since spaces are removed, quotes buy nothing
else. A few bare words get their obvious meaning instead: `true`/`false` (any case) are booleans,
`none`/`null` are None, and `inf`/`-inf`/`nan` are floats (dadaptation's `growth_rate=inf`).
"""

from __future__ import annotations

import ast
import inspect
import math
import re
from collections.abc import Callable, Iterable

OPTIMIZER_FIELD = "train_optimizer_settings"
SCHEDULER_FIELD = "train_lr_scheduler_settings"

_EXAMPLES = {
    OPTIMIZER_FIELD: "weight_decay=0.01; betas=(0.9,0.99)",
    SCHEDULER_FIELD: "eta_min=1e-6; gamma=0.9",
}
_BARE_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_WORD_VALUES = {
    "true": True, "false": False, "none": None, "null": None,
    "inf": math.inf, "+inf": math.inf, "-inf": -math.inf, "infinity": math.inf, "nan": math.nan,
}


class OptimizerSettingsError(ValueError):
    """A settings string, or a keyword in it, that the optimizer or the LR scheduler cannot take."""


def example_for(field: str) -> str:
    """The example of a well-formed settings string shown in the errors for `field`."""
    return _EXAMPLES.get(field, _EXAMPLES[OPTIMIZER_FIELD])


def _form_hint(field: str) -> str:
    return (f"Write one setting per line or separate them with ';', each as name=value, "
            f"for example: {example_for(field)}")


def _read_value(raw: str, line: str, key: str, field: str) -> object:
    """One value: a Python literal, else one of the known bare words, else a bare word as a string."""
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    if raw.lower() in _WORD_VALUES:
        return _WORD_VALUES[raw.lower()]
    if _BARE_WORD.fullmatch(raw):
        return raw
    raise OptimizerSettingsError(
        f"`{field}`: the value of '{key}' in the line '{line}' is not a Python literal (a number, "
        f"True/False/None, a quoted string, a tuple or a list) nor a single word. {_form_hint(field)}")


def parse_settings(text: str | None, *, field: str) -> dict[str, object]:
    """Read a `name=value` settings string into keyword arguments.

    Args:
        text: the field's content; None or blank gives `{}`.
        field: the parameter name shown in errors (`train_optimizer_settings` or
            `train_lr_scheduler_settings`).

    Returns:
        The keyword arguments in the order written.

    Raises:
        OptimizerSettingsError: a line or a value that cannot be read (see the module docstring).
    """
    if text is None:
        return {}
    if not isinstance(text, str):
        raise OptimizerSettingsError(f"`{field}` must be text such as '{example_for(field)}', "
                                     f"not {type(text).__name__} {text!r}")
    # The reference removes every space, so a string value can never hold one; tabs and carriage
    # returns go too, which a pasted Windows text needs.
    cleaned = re.sub(r"[ \t\r]", "", text).replace(";", "\n")
    result: dict[str, object] = {}
    for line in cleaned.split("\n"):
        if not line:
            continue
        if "=" not in line:
            raise OptimizerSettingsError(f"`{field}`: the line '{line}' has no '='. {_form_hint(field)}")
        key, raw = line.split("=", 1)
        if not key.isidentifier():
            raise OptimizerSettingsError(
                f"`{field}`: the line '{line}' needs a keyword name before '=', not '{key}'. {_form_hint(field)}")
        if not raw:
            raise OptimizerSettingsError(f"`{field}`: the line '{line}' has no value after '='. {_form_hint(field)}")
        if key in result:
            raise OptimizerSettingsError(f"`{field}`: '{key}' is given twice; keep one of the two lines.")
        result[key] = _read_value(raw, line, key, field)
    return result


def accepted_keywords(func: Callable, exclude: Iterable[str] = ()) -> list[str]:
    """The named keyword parameters of `func` (a class means its `__init__`), minus `exclude`.

    `**kwargs` is not counted as accepting anything: several optimizer packages swallow unknown
    keywords there, which would hide a misspelt setting.
    """
    target = func.__init__ if inspect.isclass(func) else func
    skip = {"self", *exclude}
    return sorted(
        name for name, p in inspect.signature(target).parameters.items()
        if name not in skip and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def check_keywords(settings: dict[str, object], accepted: list[str], *, field: str, what: str,
                   owned: dict[str, str] | None = None) -> None:
    """Raise `OptimizerSettingsError` for a setting that `what` does not take.

    Args:
        settings: the parsed settings.
        accepted: the keyword names `what` takes from the settings field.
        field: the settings field, named in the error.
        what: the optimizer or scheduler, named in the error.
        owned: keywords that another parameter sets (name -> that parameter), which the settings
            field may not override.
    """
    for key in settings:
        if owned and key in owned:
            raise OptimizerSettingsError(
                f"`{field}`: '{key}' is set by `{owned[key]}`; remove it from `{field}` and use that parameter.")
    unknown = [key for key in settings if key not in accepted]
    if unknown:
        listed = ", ".join(accepted) if accepted else "none"
        raise OptimizerSettingsError(
            f"`{field}`: {what} does not accept {', '.join(repr(k) for k in unknown)}. Accepted settings: {listed}.")
