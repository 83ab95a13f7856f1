"""What the TrainTrain page's buttons do, as plain Python (the layout is in ``ui.py``).

Every handler takes and returns plain values and ``gr.update`` dicts, so tests call them
directly and the page wires them with ``.click(fn, inputs, outputs)``. Handlers that take
the whole form receive its values in ``ui_form.FIELD_NAMES`` order.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import gradio as gr

from trainer import paths as default_paths
from trainer import plot
from trainer.ui import form as ui_form
from trainer.atomic import write_text
from trainer.config import ConfigError, TrainConfig
from trainer.data import augment
from trainer.data.errors import DataError
from trainer.modes import get_mode
from trainer.training.queue import TABLE_HEADERS, JobQueue, QueueError, format_table
from trainer.ui.runner import Runner

NEWEST_LOG = "(newest)"
AUGMENT_SIDES = augment.FIX_SIDES
# The fields a loaded preset sets: all but the image uploads (settings files hold no images).
LOADED_FIELDS = tuple(f for f in ui_form.FIELD_NAMES if f not in ("original_image", "target_image"))


@dataclass
class UiPaths:
    """Folders the page reads and writes; defaults are the extension's (trainer/paths.py)."""

    presets: Path
    jsons: Path
    logs: Path
    queue_file: Path
    inputs: Path  # copies of uploaded images, so queued runs still find them

    @classmethod
    def default(cls) -> UiPaths:
        logs = default_paths.logs_dir()
        return cls(presets=default_paths.presets_dir(), jsons=default_paths.jsons_dir(), logs=logs,
                   queue_file=default_paths.jsons_dir() / "queue.json", inputs=logs / "inputs")

    @property
    def user_presets(self) -> Path:
        """Presets the user saves (``jsons/presets/``); ``presets/`` holds the shipped ones, read-only."""
        return self.jsons / "presets"

    @property
    def state_file(self) -> Path:
        """Choices the page remembers between visits and restarts (the last model)."""
        return self.logs / "ui_state.json"

    @classmethod
    def under(cls, root: Path) -> UiPaths:
        """All folders under one root (tests, portable setups)."""
        root = Path(root)
        return cls(presets=root / "presets", jsons=root / "jsons", logs=root / "logs",
                   queue_file=root / "jsons" / "queue.json", inputs=root / "logs" / "inputs")


SHIPPED = " (shipped)"  # marks a shipped preset whose name a user preset also has


def _errors(error: ConfigError) -> str:
    return "Error: " + "\n".join(error.problems)


def _stems(folder: Path) -> list[str]:
    return sorted((p.stem for p in folder.glob("*.json")), key=str.lower) if folder.is_dir() else []


def _inside(path: Path, folders) -> bool:
    resolved = path.resolve()
    return any(resolved.is_relative_to(Path(f).resolve()) for f in folders)


class TrainTrainUI:
    """The page's state (host, queue, background runner) and its event handlers."""

    def __init__(self, host, *, standalone: bool, paths: UiPaths | None = None,
                 output_dir: Path | None = None, poll_s: float = 0.5, allowed_dirs=None):
        self.host, self.standalone = host, standalone
        self.paths = paths or UiPaths.default()
        # Load JSON reads only inside these folders (None: anywhere); see ``serve``.
        self.allowed_dirs = None if allowed_dirs is None else [Path(d) for d in allowed_dirs]
        self.queue = JobQueue(self.paths.queue_file, recover=True)
        self.runner = Runner(host, self.queue, output_dir=output_dir, logs_dir=self.paths.logs, poll_s=poll_s)

    # --- lists ---------------------------------------------------------------------------

    def model_choices(self) -> list[str]:
        """The Model list; in a web UI "(the loaded model)" comes first (the standalone page has none)."""
        lister = getattr(self.host, "list_models", None)
        listed = list(lister()) if callable(lister) else []
        return listed if self.standalone else [ui_form.LOADED_MODEL, *listed]

    def default_model(self, choices: list[str] | None = None) -> str | None:
        """The user's last model choice while it is still listed; else the loaded model (web UI)
        or the first listed model (standalone)."""
        choices = self.model_choices() if choices is None else choices
        last = self._state().get("model")
        if last in choices:
            return last
        return choices[0] if choices else None

    def blocks_for_model(self, model: str | None, model_path: str | None, blocks: list | None,
                         p2_blocks: list | None) -> tuple:
        """The block checkboxes (1st and 2nd pass) for the chosen model's family: Flux.1 and Z-Image list
        their own ids (text encoders, IN, D../S.., OUT), the SD families BASE IN.. M00 OUT... Ticked ids
        the family has stay ticked; when none does, every block but a transformer's text encoders is."""
        finder = getattr(self.host, "model_family", None)
        chosen = (model_path or "").strip() or (model or "").strip()
        loaded = not self.standalone and chosen in ("", ui_form.LOADED_MODEL)  # the web UI's loaded model
        family = finder("" if loaded else chosen) if finder is not None and (chosen or loaded) else None
        return ui_form.block_updates(family, blocks), ui_form.block_updates(family, p2_blocks)

    def remember_model(self, model: str | None) -> None:
        """Keep the Model choice for the next visit or restart (only a listed one)."""
        if model and model in self.model_choices() and self._state().get("model") != model:
            state = self._state()
            state["model"] = model
            try:
                write_text(self.paths.state_file, json.dumps(state, indent=2, ensure_ascii=False) + "\n")
            except OSError:
                pass  # only a convenience; the page works without it

    def _state(self) -> dict:
        try:
            data = json.loads(self.paths.state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def vae_choices(self) -> list[str]:
        lister = getattr(self.host, "list_vaes", None)
        return [ui_form.NO_VAE] + (list(lister()) if callable(lister) else [])

    def preset_names(self) -> list[str]:
        """Saved (user) and shipped presets by name; a shipped preset that a user preset of the
        same name shadows is listed as ``<name> (shipped)``."""
        mine, shipped = _stems(self.paths.user_presets), _stems(self.paths.presets)
        names = mine + [s + SHIPPED if s in mine else s for s in shipped]
        return sorted(names, key=str.lower)

    def preset_path(self, name: str) -> Path:
        """The file of a listed preset name (a user preset before a shipped one of the same name)."""
        if name.endswith(SHIPPED) and (self.paths.presets / f"{name[:-len(SHIPPED)]}.json").is_file():
            return self.paths.presets / f"{name[:-len(SHIPPED)]}.json"
        mine = self.paths.user_presets / f"{name}.json"
        return mine if mine.is_file() else self.paths.presets / f"{name}.json"

    def refresh_models(self):
        choices = self.model_choices()
        return gr.update(choices=choices), gr.update(choices=self.vae_choices())

    def refresh_presets(self):
        return gr.update(choices=self.preset_names())

    # --- form ----------------------------------------------------------------------------

    def change_mode(self, mode: str) -> list[dict]:
        """Visibility of every 1st-pass widget, then of the iLECO prompts, the images and the 2nd pass.

        Only visibility changes: hidden widgets keep their values, which still reach the trainer.
        """
        mode = mode or "LoRA"
        updates = [gr.update(visible=ui_form.shown(p, mode)) for p in ui_form.PASS1]
        facts = get_mode(mode)
        updates.append(gr.update(visible=facts.takes_prompts))
        updates.append(gr.update(visible=facts.takes_images))
        updates.append(gr.update(visible=facts.has_second_pass))
        return updates

    def copy_first_pass(self, *pass1_values) -> list[object]:
        """Copy every 1st-pass value of the 2nd-pass settings into the 2nd-pass panel (network_type
        too); the "use 2nd pass settings" box is not touched."""
        values = dict(zip((p.name for p in ui_form.PASS2), pass1_values))
        return ui_form.copy_first_pass(values)

    def _config(self, args: tuple, *, with_inputs: bool = True) -> TrainConfig:
        return ui_form.config_from_values(ui_form.values_of(args), image_dir=self.paths.inputs,
                                          with_inputs=with_inputs)

    # --- presets -------------------------------------------------------------------------

    def save_preset(self, overwrite: bool, *args):
        """Save the form as ``jsons/presets/<save_lora_name>.json`` (reference format, no images);
        returns (message, preset list update, overwrite box update).

        Shipped presets (``presets/``) are never written. An existing user preset is replaced only
        with ``overwrite`` ticked; the box is cleared after each save.
        """
        try:
            config = self._config(args, with_inputs=False)
        except ConfigError as error:
            return _errors(error), gr.update(), gr.update()
        name = config.save_lora_name or "untitled"
        path = self.paths.user_presets / f"{name}.json"
        existed = path.exists()
        if existed and not overwrite:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
            return (f"Not saved: your preset '{name}' exists ({path}, saved {when}). Tick 'replace my preset of "
                    "this name' and press Save preset again to replace it, or change save_lora_name."), \
                gr.update(), gr.update()
        config.to_json(path)
        note = " (replaced your earlier preset)" if existed else ""
        if (self.paths.presets / f"{name}.json").is_file():
            note += f"; the shipped preset of this name stays as '{name}{SHIPPED}'"
        return f"Preset saved: {path}{note}", gr.update(choices=self.preset_names(), value=name), False

    def load_preset(self, name: str, model: str, model_path: str, vae: str) -> list:
        """Fill the form from a listed preset; the current model stays if the preset has none."""
        if not name:
            return self._no_load("Choose a preset first.")
        return self._load(self.preset_path(name), model, model_path, vae)

    def load_json(self, name: str, model: str, model_path: str, vae: str) -> list:
        """Fill the form from a saved settings JSON: a path, or a name searched under jsons/."""
        text = (name or "").strip()
        if not text:
            return self._no_load("Type the name of a settings JSON (searched under jsons/) or its path.")
        wanted = text if text.lower().endswith(".json") else text + ".json"
        found = Path(text) if Path(text).is_file() else None
        if found is None and self.paths.jsons.is_dir():
            matches = sorted(self.paths.jsons.rglob(Path(wanted).name))
            found = next((p for p in matches if p != self.paths.queue_file), None)
        if found is None:
            return self._no_load(f"Error: {wanted} not found under {self.paths.jsons}")
        if self.allowed_dirs is not None and not _inside(found, self.allowed_dirs):
            folders = ", ".join(str(d) for d in self.allowed_dirs)
            return self._no_load(f"Error: {found} is outside the folders this page reads settings from ({folders}). "
                                 "Copy it into jsons/, or start the page with --allow-dir FOLDER.")
        return self._load(found, model, model_path, vae)

    def _load(self, path: Path, model: str, model_path: str, vae: str) -> list:
        try:
            config = TrainConfig.from_json(path)
        except ConfigError as error:
            return self._no_load(f"Error: {path}:\n" + "\n".join(error.problems))
        values = ui_form.values_from_config(config, keep_model=(model or "", model_path or ""), keep_vae=vae,
                                            model_choices=self.model_choices())
        message = "\n".join([f"Loaded {path}", *(f"warning: {w}" for w in config.warnings)])
        return [values[f] for f in LOADED_FIELDS] + [message]

    def _no_load(self, message: str) -> list:
        return [gr.update() for _ in LOADED_FIELDS] + [message]

    # --- training ------------------------------------------------------------------------

    def start(self, resume: bool, *args) -> Iterator[tuple[str, str]]:
        """Start training the form's settings in the background (``resume``: continue the stopped
        run of this name); yields (progress, message) until the run ends."""
        self.remember_model(ui_form.values_of(args).get("model"))
        try:
            config = self._config(args)
        except ConfigError as error:
            yield "", _errors(error)
            return
        refusal = self.runner.start_job(config, resume=bool(resume))
        if refusal:
            yield self.runner.snapshot().progress, refusal
            return
        warnings = [f"warning: {w}" for w in config.warnings]
        yield from self._follow(lambda snap: "\n".join([snap.message, *warnings]) if snap.running else snap.message)

    def _follow(self, message=lambda snap: snap.message):
        """(progress, message) of the run until it ends; while it runs a field is sent only when it
        changed, so a message another button wrote meanwhile stays readable; the last is sent whole."""
        shown = (None, None)
        for snap in self.runner.follow():
            now = (snap.progress, message(snap))
            yield tuple(gr.update() if new == old and snap.running else new for new, old in zip(now, shown))
            shown = now

    def stop(self) -> str:
        return self.runner.stop()

    def save_now(self) -> str:
        """Save ``<name>_<k>steps`` after the current step; the run goes on."""
        return self.runner.save_now()

    def follow(self) -> Iterator[tuple[str, str]]:
        """Progress of the current run (e.g. after the page was reloaded) until it ends."""
        if not self.runner.running and not self.runner.snapshot().progress:
            yield "Nothing is training.", gr.update()
            return
        yield from self._follow()

    def page_load(self):
        """What a freshly loaded page shows: the remembered model, the queue as it is now, the log
        list; (model, queue table, queue item, log)."""
        choices = self.model_choices()
        return (gr.update(choices=choices, value=self.default_model(choices)), *self.queue_view(),
                self.refresh_logs())

    def follow_at_load(self) -> Iterator[tuple[str, str]]:
        """Progress and message of the run going on (or the last one) when the page is loaded."""
        if not self.runner.running and not self.runner.snapshot().progress:
            yield gr.update(), gr.update()
            return
        yield from self._follow()

    # --- previews and the demo -------------------------------------------------------------

    def preview_gallery(self) -> list:
        """The gallery's value: every preview of the current or last run, newest first, captioned."""
        return [(str(path), f"step {step}: {path.name}") for path, step in reversed(self.runner.previews())]

    def with_previews(self, updates: Iterator[tuple]) -> Iterator[tuple]:
        """``updates`` (progress, message) with the preview gallery added, sent when it changed: the
        page wires Start, Show progress, the demo and the page load through this, so the gallery fills
        in the same stream as the progress."""
        shown = None
        for update in updates:
            now = self.preview_gallery()
            yield (*update, gr.update() if now == shown else now)
            shown = now

    def start_shown(self, resume: bool, *args):
        yield from self.with_previews(self.start(resume, *args))

    def follow_shown(self):
        yield from self.with_previews(self.follow())

    def follow_at_load_shown(self):
        yield from self.with_previews(self.follow_at_load())

    def start_demo_shown(self):
        yield from self.with_previews(self.start_demo())

    def start_demo(self) -> Iterator[tuple[str, str]]:
        """Try a demo run: a LoRA on a tiny built-in model (``python -m trainer demo``); (progress, message)."""
        refusal = self.runner.start_demo()
        if refusal:
            yield self.runner.snapshot().progress, refusal
            return
        yield from self._follow()

    # --- iLECO prompt preview ------------------------------------------------------------

    def generate(self, which: str, *args):
        """Generate Original / Target / All: the iLECO prompts rendered with one seed (``preview_seed``;
        "All": the same for both). In a web UI by its own txt2img with its current txt2img settings;
        standalone with the chosen model and the trainer's own sampler (``preview_size``,
        ``preview_steps``). Returns (gallery value, message)."""
        from trainer.training.previews import render

        values = ui_form.values_of(args)
        prompts = {"Original": [values["original_prompt"]], "Target": [values["target_prompt"]],
                   "All": [values["original_prompt"], values["target_prompt"]]}[which]
        if not any((p or "").strip() for p in prompts):
            return [], f"Type the {'prompts' if which == 'All' else which.lower() + ' prompt'} first."
        if self.runner.running:
            return [], "A training run is going; generate when it has finished."
        try:
            config = self._config(args, with_inputs=False)
        except ConfigError as error:
            return [], _errors(error)
        names = {"Original": ["original"], "Target": ["target"], "All": ["original", "target"]}[which]
        in_host = getattr(self.host, "generate", None)
        if not self.standalone and callable(in_host):  # the web UI's own txt2img, its settings, one seed
            try:
                images, setup = in_host([p or "" for p in prompts], seed=int(config.preview_seed),
                                        negative=config.negative_prompt or "")
            except Exception as error:
                return [], f"Error: {error}"
            message = (f"{which}: the web UI's txt2img ({setup.describe()}, {setup.width}x{setup.height}), "
                       f"seed {config.preview_seed}")
            return [(image, f"{name}: {prompt}") for image, name, prompt in zip(images, names, prompts)], message
        try:
            bundle = self.host.load(config)
        except Exception as error:  # a model that cannot load is said like a run's error
            return [], f"Error: {error}"
        from dataclasses import replace

        # read the prompts as the run will: its own clip skip and embeddings folder win over the host's
        if config.clip_skip:
            bundle.text_options = replace(bundle.text_options, clip_skip=config.clip_skip)
        if config.embeddings_dir:
            bundle.text_options = replace(bundle.text_options,
                                          embeddings_dir=str(Path(config.embeddings_dir).expanduser()))
        try:
            images = render(bundle, [p or "" for p in prompts], seed=int(config.preview_seed),
                            size=tuple(config.preview_size), steps=int(config.preview_steps),
                            negative=config.negative_prompt or "")
        finally:
            self.host.restore()
        message = (f"{which}: seed {config.preview_seed}, {config.preview_steps} steps, "
                   f"{config.preview_size[1]}x{config.preview_size[0]} (the preview settings)")
        return [(image, f"{name}: {prompt}") for image, name, prompt in zip(images, names, prompts)], message

    # --- queue ---------------------------------------------------------------------------

    def queue_view(self):
        """(table, item-dropdown update) of the queue as it is now."""
        items = self.queue.items()
        table = format_table(items) or [[""] * len(TABLE_HEADERS)]
        if not self.standalone and items:
            model = TABLE_HEADERS.index("model")
            for row in table:
                row[model] = row[model] or ui_form.LOADED_MODEL
        choices = [f"{i.id}: {i.name} ({i.status})" for i in items]
        return table, gr.update(choices=choices, value=None)

    def add_to_queue(self, *args):
        try:
            config = self._config(args)
            busy = (self.runner.current_name,) if self.runner.current_name else ()
            item = self.queue.add(config, busy_names=busy)
            message = f"Added to Queue: item {item.id} ('{item.name}', {item.mode})"
        except ConfigError as error:
            message = _errors(error)
        except QueueError as error:
            message = str(error)
        return (message, *self.queue_view())

    def delete_item(self, choice: str):
        return self._item_action(choice, self.queue.remove, "Deleted")

    def requeue_item(self, choice: str):
        after = ("it trains after the running item" if self.runner.running
                 else "press Run queue to train it")
        return self._item_action(choice, self.queue.requeue, "Pending again", after)

    def clear_finished(self):
        count = self.queue.clear_finished()
        return (f"Deleted {count} finished item(s).", *self.queue_view())

    def _item_action(self, choice: str, action, verb: str, after: str = ""):
        if not choice:
            return ("Choose a queue item first (the list under the table).", *self.queue_view())
        try:
            item = action(str(choice).split(":")[0])
            message = f"{verb}: item {item.id} ('{item.name}')" + (f"; {after}" if after else "")
        except QueueError as error:
            message = str(error)
        return (message, *self.queue_view())

    def run_queue(self):
        """Train every pending item in the background; yields (progress, message, table, items)."""
        refusal = self.runner.start_queue()
        if refusal:
            yield (self.runner.snapshot().progress, refusal, *self.queue_view())
            return
        shown, said = None, (None, None)
        for snap in self.runner.follow():
            items = self.queue.items()
            state = [(i.id, i.status) for i in items]
            # Redraw the table only when it changed, so it does not flicker while training, and
            # send the texts only when they changed, so other buttons' answers stay readable.
            view = self.queue_view() if state != shown or not snap.running else (gr.update(), gr.update())
            shown = state
            texts = (snap.progress, snap.message)
            yield (*(gr.update() if new == old and snap.running else new for new, old in zip(texts, said)), *view)
            said = texts

    # --- plot ----------------------------------------------------------------------------

    def log_choices(self) -> list[str]:
        logs = self.paths.logs
        return [NEWEST_LOG] + [p.relative_to(logs).as_posix() for p in plot.find_logs(logs)]

    def refresh_logs(self):
        return gr.update(choices=self.log_choices(), value=NEWEST_LOG)

    def draw_plot(self, name: str, smoothing: float):
        """(figure or None, message) for the chosen log; blank or '(newest)' means the newest."""
        try:
            path = plot.resolve_log("" if name in (None, NEWEST_LOG) else name, self.paths.logs)
            return plot.plot_log(path, float(smoothing or 0)), f"Showing {path}"
        except (plot.LogError, ValueError) as error:
            return None, f"Error: {error}"

    # --- image tab -----------------------------------------------------------------------

    @staticmethod
    def _augment_options(count, change_angle, angle, change_scale, scale, side, mirror) -> augment.AugmentOptions:
        return augment.AugmentOptions(count=int(count or 0), change_angle=bool(change_angle),
                                      max_angle=float(angle or 0), change_scale=bool(change_scale),
                                      min_scale=float(scale or 0), fix_side=side or "none", mirror=bool(mirror))

    def augment_folder(self, folder: str, out_dir: str, *options) -> str:
        """Image tab, From Directory: copies of every image in ``folder``; the result message."""
        try:
            return augment.augment_folder(folder, self._augment_options(*options), out_dir or None).summary()
        except (DataError, OSError) as error:
            return f"Error: {error}"

    def augment_file(self, image: str, out_dir: str, name: str, *options) -> str:
        """Image tab, From File: copies of the uploaded image into ``out_dir`` as ``<name>_id_<n>.png``."""
        if not image:
            return "Error: upload an image first (or use From Directory)."
        if not (out_dir or "").strip():
            return "Error: type an Output directory for the copies of the uploaded image."
        try:
            return augment.augment_file(image, self._augment_options(*options), out_dir,
                                        name=name or Path(image).stem).summary()
        except (DataError, OSError) as error:
            return f"Error: {error}"
