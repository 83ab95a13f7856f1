"""Converting setting values between the JSON/UI form and typed Python values.

The reference's files hold text for textboxes and dropdowns ("16", "1e-4"), booleans for
checkboxes (or "" for an unticked one) and a list for the block checkboxes (SPEC.md §3.3,
§3.5). ``to_typed`` reads any of those tolerantly and raises ``ConfigError`` with a message that
names the key, the value and what is allowed; ``to_raw`` writes the reference's form back.
Hand-written rather than pydantic: the tolerance rules and the message wording are the point,
and each is a few lines here.
"""

from __future__ import annotations

import difflib
import json
import math

from trainer.config import choices as C
from trainer.config.schema import OPTIMIZER_ALIASES, Param


class ConfigError(ValueError):
    """Bad settings. ``problems`` lists every problem found; str() gives one per line."""

    def __init__(self, problems: list[str] | str, warnings: list[str] | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.warnings = list(warnings or [])  # what else was noticed, e.g. unknown keys
        super().__init__("\n".join(self.problems))


_CHOICE_NOUNS = {
    "train_optimizer": "optimizer", "train_lr_scheduler": "learning-rate scheduler",
    "network_type": "network type", "network_element": "network element",
    "train_loss_function": "loss function", "addift_timestep_schedule": "timestep schedule",
}
_BOOL_WORDS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False,
               "on": True, "off": False, "": False}


def show(raw: object) -> str:
    """A value as the user wrote it, quoted like JSON: "16", 16, true, ["BASE"]."""
    if isinstance(raw, tuple):
        raw = list(raw)
    try:
        return json.dumps(raw, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(raw)


def offers(values: tuple) -> str:
    """A short list of offered values: '4, 8, ... 1024'."""
    shown = [fmt_number(v) for v in values]
    return ", ".join(shown) if len(shown) <= 4 else f"{shown[0]}, {shown[1]}, ... {shown[-1]}"


def allowed(p: Param) -> str:
    """What a numeric parameter accepts, in words."""
    if p.name == "train_seed":
        return f"-1 (a new random seed each run) or a whole number from 0 to {fmt_number(p.maximum)}"
    what = "a whole number" if p.kind == "int" else "a number"
    lo, hi = p.minimum, p.maximum
    if lo is not None and hi is not None:
        text = f"{what} from {fmt_number(lo)} to {fmt_number(hi)}"
    elif lo is not None:
        text = f"{what} ≥ {fmt_number(lo)}"
    else:
        text = what
    if p.choices:
        text += f" (the UI offers {offers(p.choices)})"
    return text


def fmt_number(value: float) -> str:
    """Numbers as the UI's text fields hold them: whole floats without '.0', else Python's repr."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def _parse_int(raw: object) -> int:
    if isinstance(raw, bool):
        raise ValueError("a checkbox value is not a number")
    if isinstance(raw, int):
        return raw
    number = _parse_float(raw)
    if not number.is_integer():
        raise ValueError("not a whole number")
    return int(number)


def _parse_float(raw: object) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise ValueError("not a number")
    number = float(raw.strip()) if isinstance(raw, str) else float(raw)
    if not math.isfinite(number):
        raise ValueError("not a finite number")
    return number


def _parse_bool(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str) and raw.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[raw.strip().lower()]
    raise ValueError("not true or false")


def _number(p: Param, raw: object) -> int | float:
    try:
        value = _parse_int(raw) if p.kind == "int" else _parse_float(raw)
    except (ValueError, OverflowError):
        raise ConfigError(f"{p.key}: {show(raw)} is not allowed; use {allowed(p)}") from None
    if (p.minimum is not None and value < p.minimum) or (p.maximum is not None and value > p.maximum):
        raise ConfigError(f"{p.key}: {show(raw)} is not allowed; use {allowed(p)}")
    return value


def _choice(p: Param, raw: object) -> str:
    text = fmt_number(raw) if isinstance(raw, (int, float)) and not isinstance(raw, bool) else raw
    if isinstance(text, str):
        text = text.strip()
        if text in p.choices:
            return text
        folded = {c.lower(): c for c in p.choices}
        if p.name == "train_optimizer":
            folded = OPTIMIZER_ALIASES
        elif "precision" in p.name:
            text = C.PRECISION_ALIASES.get(text.lower(), text)
        if text.lower() in folded:
            return folded[text.lower()]
    listed = ", ".join(p.choices)
    if p.name == "train_optimizer" and isinstance(raw, str) and raw.strip().startswith("--"):
        raise ConfigError(f"{p.key}: {show(raw)} is a separator line of the optimizer list, "
                          f"not an optimizer; choose one of {listed}")
    noun = _CHOICE_NOUNS.get(p.name, "value for this setting")
    near = difflib.get_close_matches(str(text).lower(), [c.lower() for c in p.choices], n=1, cutoff=0.5)
    hint = "".join(f" Did you mean '{c}'?" for c in p.choices if near and c.lower() == near[0])
    raise ConfigError(f"{p.key}: {show(raw)} is not a known {noun}.{hint} Choose one of {listed}")


def _blocks(p: Param, raw: object) -> list[str]:
    items = raw.split(",") if isinstance(raw, str) else raw
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise ConfigError(f"{p.key}: {show(raw)} is not allowed; use a list of block ids "
                          f"such as [\"BASE\", \"IN01\", \"M00\"]")
    wanted = {i.strip().upper() for i in items if i.strip()}
    known = tuple(dict.fromkeys(tuple(p.choices) + C.TRANSFORMER_BLOCK_IDS))  # + Flux / Z-Image ids
    unknown = sorted(wanted - set(known))
    if unknown:
        raise ConfigError(f"{p.key}: {', '.join(show(u) for u in unknown)} "
                          f"{'is not a block id' if len(unknown) == 1 else 'are not block ids'}; "
                          f"use any of {', '.join(p.choices)} (Flux.1: CLIP T5 IN D00-D18 S00-S37 OUT; "
                          "Z-Image: QWEN3 IN S00-S29 OUT)")
    if not wanted:
        raise ConfigError(f"{p.key}: no block is selected, so nothing would be trained; "
                          f"choose at least one of {', '.join(p.choices)}")
    return [b for b in known if b in wanted]


def _size(p: Param, raw: object) -> tuple[int, int]:
    parts = raw.split(",") if isinstance(raw, str) else raw
    if isinstance(parts, (int, float)) and not isinstance(parts, bool):
        parts = [parts]
    try:
        if not isinstance(parts, (list, tuple)) or len(parts) not in (1, 2):
            raise ValueError
        sides = [_parse_int(s) for s in parts]
    except (ValueError, OverflowError):
        raise ConfigError(f"{p.key}: {show(raw)} must be one number or two numbers separated by a "
                          f"comma, e.g. \"768,512\"") from None
    if any(s < 8 or s % 8 for s in sides):
        raise ConfigError(f"{p.key}: {show(raw)} is not allowed; each side must be a positive "
                          f"multiple of 8 pixels (the VAE works on 8x8-pixel cells), e.g. \"768,512\"")
    return (sides[0], sides[-1])


def _optional_float(p: Param, raw: object) -> float | None:
    # Blank, 0 or unreadable means "same as the main learning rate", silently (SPEC.md §3.3).
    try:
        value = _parse_float(raw)
    except (ValueError, OverflowError):
        return None
    if value < 0:
        raise ConfigError(f"{p.key}: {show(raw)} is not allowed; use a positive number, or leave it "
                          f"blank for the same rate as train_learning_rate")
    return value or None


def _text(p: Param, raw: object) -> str:
    if isinstance(raw, str):
        return raw
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return fmt_number(raw)
    raise ConfigError(f"{p.key}: {show(raw)} is not allowed; use text")


def to_typed(p: Param, raw: object) -> object:
    """Convert one JSON/UI/CLI value to the parameter's type; ConfigError naming the problem."""
    if raw is None:
        return p.default if p.kind != "blocks" else list(p.default)
    if p.kind in ("int", "float"):
        return _number(p, raw)
    if p.kind == "bool":
        try:
            return _parse_bool(raw)
        except ValueError:
            raise ConfigError(f"{p.key}: {show(raw)} is not allowed; use true or false") from None
    handlers = {"choice": _choice, "blocks": _blocks, "size": _size,
                "optional_float": _optional_float, "str": _text}
    return handlers[p.kind](p, raw)


def to_raw(p: Param, value: object) -> object:
    """The reference's saved form of a typed value: text for textboxes and dropdowns."""
    if p.kind == "bool":
        return bool(value)
    if p.kind == "blocks":
        return list(value)
    if p.kind == "size":
        height, width = value
        return str(height) if height == width else f"{height},{width}"
    if p.kind == "optional_float":
        return "" if value is None else fmt_number(value)
    if p.kind in ("int", "float"):
        return fmt_number(value)
    return value


def display(p: Param, value: object) -> str:
    """A typed value for people: numbers plain, text quoted, blocks comma-separated."""
    if p.kind == "optional_float" and value is None:
        return "(same as train_learning_rate)"
    if p.kind == "blocks":
        return ", ".join(value)
    raw = to_raw(p, value)
    return show(raw) if p.kind == "str" else (str(raw).lower() if p.kind == "bool" else str(raw))


def parse_step_rules(text: str, key: str = "train_lr_step_rules") -> list[tuple[float, int] | float]:
    """Check a piecewise_constant rule string 'm1:s1,m2:s2,...,m_last' and return its parts.

    Each ``m:s`` keeps multiplier m until step s; the last bare number applies after that.
    """
    rules: list[tuple[float, int] | float] = []
    parts = [part.strip() for part in (text or "").split(",")]
    try:
        for part in parts[:-1]:
            multiplier, _, step = part.partition(":")
            rules.append((float(multiplier), int(step)))
        rules.append(float(parts[-1]))
    except ValueError:
        raise ConfigError(f"{key}: {show(text)} is not allowed; write 'multiplier:step' pairs and a "
                          f"final multiplier, separated by commas, e.g. \"1:100,0.5:200,0.1\"") from None
    return rules
