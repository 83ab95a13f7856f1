"""The Train tab's form: one widget per parameter of the schema, and the conversions between
widget values and settings.

Widgets hold what the reference's UI holds (SPEC.md §2, §3.1): text for textboxes and
dropdowns (``"16"``, ``"1e-4"``), booleans for checkboxes, a list for the block checkboxes.
So a form's values are the reference's settings JSON values, and ``TrainConfig.from_dict``
does all conversion and checking. Values travel as a dict keyed by field name:
``FIXED_FIELDS`` (mode, model, prompts, images, the 2nd-pass switch), every parameter's
attribute name for the 1st-pass panel, and ``"2nd:" + name`` for the 2nd-pass panel.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import gradio as gr

from trainer.config import PARAMS, Param, TrainConfig
from trainer.config.values import fmt_number, to_raw
from trainer.modes import get_mode

FIXED_FIELDS = ("mode", "model", "model_path", "vae", "te", "original_prompt", "target_prompt",
                "negative_prompt", "original_image", "target_image", "use_2nd_pass_settings")
PASS1 = tuple(p for p in PARAMS if p.name != "use_2nd_pass_settings")
PASS2 = tuple(p for p in PARAMS if p.second_pass and p.name != "use_2nd_pass_settings")
PARAMS_BY_NAME = {p.name: p for p in PARAMS}
P2 = "2nd:"
FIELD_NAMES = FIXED_FIELDS + tuple(p.name for p in PASS1) + tuple(P2 + p.name for p in PASS2)
NO_VAE = "None"
# The web-UI tab's first Model entry: train on the checkpoint the web UI has loaded. It is
# saved as "" (the reference's blank model), which the web-UI host reads the same way.
LOADED_MODEL = "(the loaded model)"
_BLANK_MODELS = ("", "None", LOADED_MODEL)


def label(p: Param) -> str:
    """The reference's label: the JSON key with '_' shown as a space."""
    return p.key.replace("_", " ")


def elem_id(name: str, prefix: str = "") -> str:
    """``traintrain_`` + prefix + the name reduced to letters, digits and '_'."""
    slug = re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower()
    return f"traintrain_{prefix}{slug}"


def shown(p: Param, mode: str) -> bool:
    """Whether the 1st-pass widget of ``p`` is visible in ``mode``."""
    return get_mode(mode).shows(p)


def ui_value(p: Param, typed: object) -> object:
    """A typed setting as its widget holds it."""
    raw = to_raw(p, typed)
    if p.ui == "CH":
        return bool(raw)
    if p.ui == "CB":
        return list(raw)
    return "" if raw is None else str(raw)


def dropdown_choices(p: Param) -> list[str]:
    return [fmt_number(c) if not isinstance(c, str) else c for c in p.choices]


def help_text(p: Param) -> str:
    """The widget's help line; for network_type it also says which choices cannot train here
    (LoHa without lycoris-lora) and what to install, before the user picks one and presses Start."""
    if p.name != "network_type":
        return p.help
    from trainer.compat import network_type_problem

    missing = [f"{choice} is not available here: {problem}" for choice in p.choices
               if (problem := network_type_problem(choice))]
    return " ".join([p.help, *missing])


def make_widget(p: Param, value: object, prefix: str = "", visible: bool = True):
    """The gradio component for one parameter (label = key, help as ``info``)."""
    common = dict(label=label(p), info=help_text(p), elem_id=elem_id(p.name, prefix), visible=visible)
    if p.ui == "DD":
        # Numeric dropdowns offer common values; others in range are valid, so typing is allowed.
        return gr.Dropdown(choices=dropdown_choices(p), value=value, allow_custom_value=p.kind != "choice",
                           **common)
    if p.ui == "CH":
        return gr.Checkbox(value=value, **common)
    if p.ui == "CB":
        return gr.CheckboxGroup(choices=list(p.choices), value=value, **common)
    return gr.Textbox(value=value, lines=3 if p.name.endswith("_prompts") else 1, **common)


def block_ids(family: str | None) -> tuple:
    """The block ids the page lists for a model family (None: not known, the SD list)."""
    from trainer.config.choices import BLOCKID26, FLUX_BLOCK_IDS, ZIMAGE_BLOCK_IDS

    return {"flux": FLUX_BLOCK_IDS, "zimage": ZIMAGE_BLOCK_IDS}.get(family or "", BLOCKID26)


def block_updates(family: str | None, ticked: list | None):
    """A ``gr.update`` of a block CheckboxGroup for ``family``: its ids, the ticked ones it has kept;
    none left: every id but a transformer family's text encoders (those train only when ticked)."""
    from trainer.config.choices import TEXT_ENCODER_IDS

    ids = block_ids(family)
    kept = [b for b in ids if b in (ticked or [])]
    if not kept:
        kept = [b for b in ids if not (family in ("flux", "zimage") and b in TEXT_ENCODER_IDS)]
    return gr.update(choices=list(ids), value=kept)


def default_values() -> dict[str, object]:
    """Every field at its default (mode LoRA, no model, empty prompts and images)."""
    return values_from_config(TrainConfig(), keep_model=("", ""), keep_vae=NO_VAE)


def values_from_config(config: TrainConfig, *, keep_model: tuple[str, str], keep_vae: str = NO_VAE,
                       model_choices=()) -> dict[str, object]:
    """Field values that show ``config``; images are left as they are (not in this dict).

    A config without a model keeps the current choice ``keep_model`` = (dropdown, path):
    shipped presets hold ``"model": ""`` and must not blank the user's model (the reference
    did). The VAE likewise. A model that is not among ``model_choices`` goes into the path field.
    """
    values: dict[str, object] = {p.name: ui_value(p, getattr(config, p.name)) for p in PASS1}
    second = config.second_pass or config
    values.update({P2 + p.name: ui_value(p, getattr(second, p.name)) for p in PASS2})
    if config.model not in _BLANK_MODELS:
        in_list = config.model in model_choices
        values["model"], values["model_path"] = (config.model, "") if in_list else (keep_model[0], config.model)
    else:
        values["model"], values["model_path"] = keep_model
    values["vae"] = config.vae or keep_vae or NO_VAE
    values["te"] = config.te or ""
    values.update(mode=config.mode, original_prompt=config.original_prompt, target_prompt=config.target_prompt,
                  negative_prompt=config.negative_prompt, use_2nd_pass_settings=config.use_2nd_pass_settings)
    return values


def settings_from_values(values: dict[str, object], *, image_dir: Path | None = None,
                         with_inputs: bool = True) -> dict[str, object]:
    """The settings dict (reference JSON keys) of the form.

    ``with_inputs`` adds the negative prompt and the image paths (a run or a queue item needs
    them, a preset does not). Uploaded images are copied into ``image_dir`` under a name
    made from their content, so the settings still point at them after the upload cache is
    cleared or the program restarts.
    """
    settings: dict[str, object] = {p.key: values[p.name] for p in PASS1}
    settings["use_2nd_pass_settings"] = bool(values["use_2nd_pass_settings"])
    mode = values["mode"] or "LoRA"
    if get_mode(mode).has_second_pass:
        settings["2nd pass"] = {p.key: values[P2 + p.name] for p in PASS2}
    model = str(values.get("model_path") or "").strip() or str(values.get("model") or "")
    if model == LOADED_MODEL:
        model = ""
    vae = str(values.get("vae") or "")
    settings.update({"mode": mode, "model": model, "vae": "" if vae == NO_VAE else vae,
                     "te": str(values.get("te") or "").strip(),
                     "original prompt": values["original_prompt"] or "",
                     "target prompt": values["target_prompt"] or ""})
    if with_inputs:
        settings["negative prompt"] = values["negative_prompt"] or ""
        if get_mode(mode).takes_images:
            for key, field in (("original image", "original_image"), ("target image", "target_image")):
                if values.get(field):
                    settings[key] = str(keep_image(values[field], image_dir))
    return settings


def config_from_values(values: dict[str, object], *, image_dir: Path | None = None,
                       with_inputs: bool = True) -> TrainConfig:
    """A validated TrainConfig of the form; ConfigError names every bad field."""
    return TrainConfig.from_dict(settings_from_values(values, image_dir=image_dir, with_inputs=with_inputs))


def keep_image(path: str | Path, image_dir: Path | None) -> Path:
    """Copy an uploaded image into ``image_dir`` as ``<sha1 prefix><suffix>``; returns the copy.

    Without ``image_dir`` the path is returned as it is.
    """
    source = Path(path)
    if image_dir is None or not source.is_file():
        return source
    digest = hashlib.sha1(source.read_bytes()).hexdigest()[:16]
    target = Path(image_dir) / f"{digest}{source.suffix.lower() or '.png'}"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return target


def copy_first_pass(values: dict[str, object]) -> list[object]:
    """The 2nd-pass panel's new values: every 1st-pass value, network_type included.

    (The reference skipped network_type and reset the "use 2nd pass settings" box; this
    copies all settings and leaves the box as the user set it.)
    """
    return [values[p.name] for p in PASS2]


def values_of(args: tuple, names: tuple[str, ...] = FIELD_NAMES) -> dict[str, object]:
    """Event arguments (in ``names`` order) as a dict."""
    if len(args) != len(names):
        raise ValueError(f"the form sent {len(args)} values for {len(names)} fields")
    return dict(zip(names, args))
