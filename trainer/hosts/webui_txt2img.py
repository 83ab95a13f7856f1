"""Images from the web UI's own txt2img, and what its LoRA loader made of a file (HOSTS.md §2, §4).

Beside ``webui.py``, the only module that imports the host's ``modules``. What it relies on, read in
AUTOMATIC1111 1.8.0 and Forge (``dfdcbab6``) and recorded in ``tests/data/hosts/api/txt2img.json``:

- txt2img: ``modules.processing.StableDiffusionProcessingTxt2Img(...)`` (a dataclass; only the fields
  the running host has are passed: ``scheduler`` is Forge / A1111 1.9+) and ``process_images(p)`` ->
  ``Processed.images``; on Forge through ``modules_forge.main_thread.run_and_wait_result``, as its
  txt2img does. ``do_not_save_samples/grid`` keep the host's outputs folder clean.
- The host's txt2img settings: its ``ui-config.json`` (``--ui-config-file``; the values the txt2img tab
  starts with, ``txt2img/Sampling method/value``..., or ``customscript/sampler.py/txt2img/...`` where
  the sampler is a script, Forge and A1111 1.9+), else on Forge its UI preset's options
  (``<preset>_t2i_sampler``, ``_scheduler``, ``_cfg``), else the host's own defaults.
- A LoRA goes through the prompt (``<lora:name:w>``), so the host's extra-network path loads it.
  AUTOMATIC1111 keeps what it matched in ``networks.loaded_networks`` (``Network.modules``, each with
  its ``network_key``); keys it could not match are only logged at debug level, so the unmatched
  ones are the file's modules no ``network_key`` names. Forge prints its loader's report
  (``[LORA] Loaded <file> for KModel-UNet with N keys at weight w (skipped K keys) ...``, ``... with
  unmatched keys [...]``, ``LoRA version mismatch``: more than 12 unmatched keys and the file is not
  used), read here from the console while the image is made.
- Afterwards the networks are dropped and the weights put back the way each host does it
  (A1111: ``load_networks([])`` and each layer's ``network_restore_weights_from_backup`` /
  ``network_reset_cached_weight``; Forge: ``load_networks([])`` puts the original patchers back and
  ``refresh_loras()`` restores the backed-up weights), so the model is as it was.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_UI_KEYS = {"sampler": ("Sampling method",), "scheduler": ("Schedule type",), "steps": ("Sampling steps",),
            "cfg_scale": ("CFG Scale",), "width": ("Width",), "height": ("Height",)}
_SCRIPT = "customscript/sampler.py/"


@dataclass(frozen=True)
class Txt2ImgSettings:
    """The host's txt2img settings a generation here uses."""

    sampler: str | None = None
    scheduler: str | None = None
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512

    def describe(self) -> str:
        sampler = self.sampler or "the default sampler"
        scheduler = f" ({self.scheduler})" if self.scheduler and self.scheduler != "Automatic" else ""
        return f"{sampler}{scheduler}, {self.steps} steps, CFG {self.cfg_scale:g}"


@dataclass
class HostLoad:
    """What the host's LoRA loader made of one file."""

    file: Path
    host: str
    modules: int = 0             # modules (weights) the host patched from the file
    file_modules: int = 0        # modules the file holds
    unmatched: list = field(default_factory=list)  # the file's module names the host found no layer for
    said: list = field(default_factory=list)       # the loader's own lines (Forge)
    error: str = ""              # the host did not use the file


def settings(flavour: str) -> Txt2ImgSettings:
    """The host's txt2img settings now (see the module docstring)."""
    from modules import shared

    found: dict[str, Any] = {}
    path = getattr(shared.cmd_opts, "ui_config_file", None)
    try:
        ui = json.loads(Path(path).read_text(encoding="utf-8")) if path else {}
    except (OSError, ValueError):
        ui = {}
    for name, labels in _UI_KEYS.items():
        for label in labels:
            for key in (f"txt2img/{label}/value", f"{_SCRIPT}txt2img/{label}/value"):
                if key in ui and name not in found:
                    found[name] = ui[key]
    if flavour == "Forge":
        preset = str(getattr(shared.opts, "forge_preset", "sd") or "sd")
        for name, option in (("sampler", "t2i_sampler"), ("scheduler", "t2i_scheduler"), ("cfg_scale", "t2i_cfg"),
                             ("width", "t2i_width"), ("height", "t2i_height")):
            value = getattr(shared.opts, f"{preset}_{option}", None)
            if value is not None and name not in found:
                found[name] = value
    base = Txt2ImgSettings()
    try:
        return Txt2ImgSettings(sampler=str(found["sampler"]) if found.get("sampler") else None,
                               scheduler=str(found["scheduler"]) if found.get("scheduler") else None,
                               steps=int(found.get("steps", base.steps)),
                               cfg_scale=float(found.get("cfg_scale", base.cfg_scale)),
                               width=int(found.get("width", base.width)), height=int(found.get("height", base.height)))
    except (TypeError, ValueError):
        return base


def txt2img(prompt: str, *, negative: str, seed: int, setup: Txt2ImgSettings, width: int, height: int):
    """One image of ``prompt`` from the host's txt2img (the caller holds the host's queue lock)."""
    from modules import processing, shared

    cls = processing.StableDiffusionProcessingTxt2Img
    accepted = {f.name for f in dataclasses.fields(cls) if f.init}
    values = dict(sd_model=shared.sd_model, prompt=prompt, negative_prompt=negative, seed=int(seed),
                  sampler_name=setup.sampler, scheduler=setup.scheduler, steps=setup.steps,
                  cfg_scale=setup.cfg_scale, width=int(width), height=int(height), batch_size=1, n_iter=1,
                  do_not_save_samples=True, do_not_save_grid=True)
    p = cls(**{k: v for k, v in values.items() if k in accepted and v is not None})
    try:
        try:
            from modules_forge import main_thread
        except ImportError:
            processed = processing.process_images(p)
        else:
            processed = main_thread.run_and_wait_result(processing.process_images, p)
    finally:
        close = getattr(p, "close", None)
        if callable(close):
            close()
    if not processed.images:
        raise RuntimeError("the web UI's txt2img returned no image (interrupted?)")
    return processed.images[0]


class _Echo(io.TextIOBase):
    """The console, with every line also kept (Forge's loader prints its report)."""

    def __init__(self, console):
        self.console = console
        self.text = []

    def write(self, text):
        self.text.append(text)
        return self.console.write(text)

    def flush(self):
        self.console.flush()

    @property
    def lines(self) -> list[str]:
        return "".join(self.text).splitlines()


@contextlib.contextmanager
def console_lines():
    """Lines the host prints meanwhile (still shown on its console)."""
    echo = _Echo(sys.stdout)
    with contextlib.redirect_stdout(echo):
        yield echo


def prepare_report(flavour: str) -> None:
    """Make the host load (and so report on) the next LoRA afresh: Forge skips loading when the
    same files and weights were applied last, and keeps the last five files read by name."""
    if flavour != "Forge":
        return
    from modules import shared

    networks = sys.modules.get("networks")
    cached = getattr(networks, "load_lora_state_dict", None)
    if callable(getattr(cached, "cache_clear", None)):
        cached.cache_clear()  # a re-saved file of the same name would otherwise be read from memory
    model = shared.sd_model
    if hasattr(model, "current_lora_hash"):
        model.current_lora_hash = ""


def _file_modules(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key.split(".", 1)[0] for key in handle.keys()}


_LOADED = re.compile(r"\[LORA\] Loaded (.+) for (\S+)-(UNet|CLIP) with (\d+) keys at weight \S+ \(skipped (\d+) keys\)")
_UNMATCHED = re.compile(r"\[LORA\] Loading (.+) for \S+ with unmatched keys (\[.*\])")
_MISMATCH = re.compile(r"\[LORA\] (?:LoRA version mismatch for \S+: (.+)|Mismatch (.+) for \S+ with (\d+) keys mismatched)")


def report(flavour: str, path: Path, said: list[str]) -> HostLoad:
    """What the host's loader made of ``path`` in the generation just made (``said``: its console lines)."""
    path = Path(path)
    result = HostLoad(path, flavour, file_modules=len(_file_modules(path)))
    if flavour == "Forge":
        return _forge_report(result, said)
    networks = sys.modules.get("networks")
    net = next((n for n in getattr(networks, "loaded_networks", []) if n.name == path.stem), None)
    if net is None:
        result.error = "AUTOMATIC1111 did not load it (its console says why)"
        return result
    matched = {str(m.network_key).split(".", 1)[0] for m in net.modules.values()}
    result.modules = len(net.modules)
    result.unmatched = sorted(_file_modules(path) - matched)
    return result


def _forge_report(result: HostLoad, said: list[str]) -> HostLoad:
    name = result.file.name
    mine = [line.strip() for line in said if "[LORA]" in line and name in line]
    result.said = mine
    skipped = 0
    for line in mine:
        if (found := _LOADED.search(line)) and Path(found.group(1)).name == name:
            result.modules += int(found.group(4))
            skipped += int(found.group(5))
        elif (found := _UNMATCHED.search(line)) and Path(found.group(1)).name == name:
            try:
                keys = ast.literal_eval(found.group(2))
            except (ValueError, SyntaxError):
                keys = []
            result.unmatched += sorted({str(k).split(".", 1)[0] for k in keys} - set(result.unmatched))
        elif _MISMATCH.search(line):
            result.error = f"Forge did not use it: {line}"
    if result.error and not result.unmatched:
        result.unmatched = _forge_unmatched(result.file)
    if not mine:
        result.error = "Forge's LoRA loader said nothing about it"
    elif skipped and not result.unmatched:
        result.unmatched = [f"({skipped} keys)"]
    return result


def _forge_unmatched(path: Path) -> list[str]:
    """The file's modules Forge's own key maps find no weight for (it names them only up to 12)."""
    try:
        from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet
        from modules import shared
        from safetensors.torch import load_file

        objects = shared.sd_model.forge_objects_original
        state = load_file(str(path))
        _, left = load_lora(state, model_lora_keys_unet(objects.unet.model, {}))
        _, left = load_lora(left, model_lora_keys_clip(objects.clip.cond_stage_model, {}))
    except Exception:  # only a fuller report; the mismatch itself is already said
        return []
    return sorted({key.split(".", 1)[0] for key in left})


def drop_networks(flavour: str) -> None:
    """No LoRA on the host's model any more: the weights it had before (see the module docstring)."""
    from modules import shared

    networks = sys.modules.get("networks")
    if networks is None:
        return
    networks.load_networks([], [], [], [])
    model = shared.sd_model
    if flavour == "Forge":
        objects = model.forge_objects
        for patcher in (objects.unet, getattr(objects.clip, "patcher", None)):
            if patcher is not None and hasattr(patcher, "refresh_loras"):
                patcher.refresh_loras()
        return
    for module in getattr(model, "network_layer_mapping", {}).values():
        if getattr(module, "network_current_names", ()) or getattr(module, "network_weights_backup", None) is not None:
            networks.network_restore_weights_from_backup(module)
            networks.network_reset_cached_weight(module)
