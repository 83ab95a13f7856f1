"""The TrainTrain page: Train, Queue, Plot and Image tabs, built from the parameter schema.

``build_ui(host, standalone=...)`` returns a ``gr.Blocks``; the web-UI's ``on_ui_tabs`` callback
(``scripts/traintrain.py``) builds it with a WebUIHost, and ``python -m trainer ui`` serves the
same page on its own (``trainer/cli/ui.py``) with a :class:`~trainer.hosts.standalone.StandaloneHost`.

Works on gradio 3.41 (AUTOMATIC1111), 4.x (Forge) and 5/6: only ``gr.update``, plain layout
blocks and components with arguments all of them accept, events as ``.click(fn, inputs,
outputs)``; the rest is in ``ui.compat``. Every elem_id starts with ``traintrain_`` and the
whole page sits in ``#traintrain_tab``, so style.css touches nothing else of a host's page.
Long runs go to a background thread (``ui.runner``); Start and Run queue are generators
that show its progress, so the page stays responsive and Stop works meanwhile.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from trainer.config import choices as C
from trainer.ui import compat as ui_compat
from trainer.ui import form as ui_form
from trainer.paths import ROOT
from trainer.training.queue import TABLE_HEADERS
from trainer.ui.actions import AUGMENT_SIDES, LOADED_FIELDS, NEWEST_LOG, TrainTrainUI, UiPaths

__all__ = ["build_ui", "TrainTrainUI", "UiPaths"]

_ROW = 3       # text and dropdown widgets per row
_CH_ROW = 4    # checkboxes per row
QUEUE_HELP = ("**Add to Queue** on the Train tab reserves a run; runs wait here until **Run queue** "
              "(Start Training trains only the Train tab's settings). They train one after another, and a "
              "failing run does not stop the rest. **Stop** ends the current run (what it learned is saved) "
              "and the queue run; the items left stay *pending*, press **Run queue** to continue. "
              "The queue is kept in a file, so it survives a restart.")


def _rows(params, values: dict, prefix: str, key_prefix: str = "", mode: str | None = None) -> dict:
    """Widgets for ``params`` in rows (text/dropdowns, then checkboxes, then block lists);
    with ``mode``, those without effect there start hidden."""
    widgets = {}
    texts = [p for p in params if p.ui in ("DD", "TX")]
    checks = [p for p in params if p.ui == "CH"]
    blocks = [p for p in params if p.ui == "CB"]
    for group, size in ((texts, _ROW), (checks, _CH_ROW), (blocks, 1)):
        for start in range(0, len(group), size):
            with gr.Row():
                for p in group[start:start + size]:
                    visible = mode is None or ui_form.shown(p, mode)
                    widgets[key_prefix + p.name] = ui_form.make_widget(p, values[key_prefix + p.name], prefix,
                                                                       visible)
    return widgets


def _train_tab(ui: TrainTrainUI, w: dict) -> dict:
    """The Train tab's widgets; fills ``w`` (field name -> component) and returns the buttons."""
    values = ui_form.default_values()
    b = {}
    with gr.Row():
        w["message"] = gr.Textbox(label="Message", lines=2, max_lines=12, interactive=False,
                                  elem_id="traintrain_message")
        w["progress"] = gr.Textbox(label="Progress", lines=2, interactive=False, elem_id="traintrain_progress")
    with gr.Row(elem_id="traintrain_buttons"):
        b["start"] = gr.Button("Start Training", variant="primary", elem_id="traintrain_start")
        b["stop"] = gr.Button("Stop and Save", variant="stop", elem_id="traintrain_stop")
        b["save_now"] = gr.Button("Save now", elem_id="traintrain_save_now")
        b["queue"] = gr.Button("Add to Queue", elem_id="traintrain_add_queue")
        b["follow"] = gr.Button("Show progress", elem_id="traintrain_show_progress")
        # the standalone page without a model: one click shows what a run looks like
        b["demo"] = gr.Button("Try a demo run", visible=ui.standalone and not ui.model_choices(),
                              elem_id="traintrain_demo")
    w["resume"] = gr.Checkbox(value=False, label="resume the stopped run",
                              info="Start continues the last stopped run of this save lora name from where "
                                   "Stop left it, instead of starting over.", elem_id="traintrain_resume")
    with gr.Row(elem_id="traintrain_presets"):
        w["preset"] = gr.Dropdown(choices=ui.preset_names(), value=None, label="Preset", scale=3,
                                  elem_id="traintrain_preset")
        b["load"] = gr.Button("Load preset", scale=1, elem_id="traintrain_load_preset")
        b["save"] = gr.Button("Save preset", scale=1, elem_id="traintrain_save_preset")
        w["preset_overwrite"] = gr.Checkbox(value=False, label="replace my preset of this name",
                                            elem_id="traintrain_preset_overwrite")
        b["refresh_presets"] = gr.Button("Refresh list", scale=1, elem_id="traintrain_refresh_presets")
        w["json_name"] = gr.Textbox(label="Settings JSON: a name under jsons/, or a path", lines=1, scale=3,
                                    elem_id="traintrain_json_name")
        b["load_json"] = gr.Button("Load JSON", scale=1, elem_id="traintrain_load_json")
    w["mode"] = gr.Radio(choices=list(C.MODES), value=values["mode"], label="Mode", elem_id="traintrain_mode")
    with gr.Row(elem_id="traintrain_models"):
        models = ui.model_choices()
        w["model"] = gr.Dropdown(choices=models, value=ui.default_model(models), label="Model", scale=3,
                                 elem_id="traintrain_model")
        w["model_path"] = gr.Textbox(label="or model path (used instead of the list when set)", lines=1, scale=3,
                                     elem_id="traintrain_model_path")
        w["vae"] = gr.Dropdown(choices=ui.vae_choices(), value=ui_form.NO_VAE, label="VAE", allow_custom_value=True,
                               scale=2, elem_id="traintrain_vae")
        w["te"] = gr.Textbox(label="Text Encoder (Flux.1 / Z-Image transformer files: the folder of their "
                                   "text encoders)", lines=1, scale=2, elem_id="traintrain_te")
        b["refresh_models"] = gr.Button("Refresh models", scale=1, elem_id="traintrain_refresh_models")
    with gr.Group(visible=False, elem_id="traintrain_ileco") as w["ileco_group"]:
        w["original_prompt"] = gr.Textbox(label="Original Prompt", lines=2, elem_id="traintrain_original_prompt",
                                          info="The concept to move (iLECO).")
        w["target_prompt"] = gr.Textbox(label="Target Prompt", lines=2, elem_id="traintrain_target_prompt",
                                        info="What the original prompt should produce; blank erases the concept.")
        w["negative_prompt"] = gr.Textbox(label="Negative Prompt", lines=1, elem_id="traintrain_negative_prompt",
                                          info="Not used in training; kept with the run's settings.")
        with gr.Row():
            b["gen_original"] = gr.Button("Generate Original", elem_id="traintrain_generate_original")
            b["gen_target"] = gr.Button("Generate Target", elem_id="traintrain_generate_target")
            b["gen_all"] = gr.Button("Generate All", elem_id="traintrain_generate_all")
        w["generated"] = gr.Gallery(label="Prompt preview (the model chosen above; preview seed, size and steps)"
                                    if ui.standalone else
                                    "Prompt preview (the web UI's txt2img and its settings; the preview seed)",
                                    columns=2, elem_id="traintrain_generated")
    with gr.Row(visible=False, elem_id="traintrain_images") as w["images_group"]:
        w["original_image"] = gr.Image(type="filepath", image_mode="RGBA", label="Original Image",
                                       elem_id="traintrain_original_image")
        w["target_image"] = gr.Image(type="filepath", image_mode="RGBA", label="Target Image",
                                     elem_id="traintrain_target_image")
    w["previews"] = gr.Gallery(label="Previews (preview_every_steps; each image: a row per prompt, network on "
                                     "left, off right)", columns=4, elem_id="traintrain_previews")
    required = [p for p in ui_form.PASS1 if p.group == "required"]
    optional = [p for p in ui_form.PASS1 if p.group == "optional"]
    with gr.Accordion("Required Parameters", open=True, elem_id="traintrain_required"):
        w.update(_rows(required, values, "", mode=values["mode"]))
    with gr.Accordion("Option Parameters", open=True, elem_id="traintrain_optional"):
        w.update(_rows(optional, values, "", mode=values["mode"]))
    with gr.Accordion("2nd pass", open=False, visible=False, elem_id="traintrain_second_pass") as w["pass2_group"]:
        with gr.Row():
            w["use_2nd_pass_settings"] = gr.Checkbox(value=False, label="use 2nd pass settings",
                                                     info=ui_form.PARAMS_BY_NAME["use_2nd_pass_settings"].help,
                                                     elem_id="traintrain_use_2nd_pass_settings")
            b["copy"] = gr.Button("Copy settings from 1st pass", elem_id="traintrain_copy_1st_pass")
        w.update(_rows(ui_form.PASS2, values, "p2_", ui_form.P2))
    return b


def _queue_tab(ui: TrainTrainUI, w: dict) -> dict:
    b = {}
    gr.Markdown(QUEUE_HELP)
    with gr.Row():
        w["queue_message"] = gr.Textbox(label="Message", lines=2, max_lines=12, interactive=False,
                                        elem_id="traintrain_queue_message")
        w["queue_progress"] = gr.Textbox(label="Progress", lines=2, interactive=False,
                                         elem_id="traintrain_queue_progress")
    with gr.Row():
        b["run"] = gr.Button("Run queue", variant="primary", elem_id="traintrain_run_queue")
        b["stop"] = gr.Button("Stop and Save", variant="stop", elem_id="traintrain_queue_stop")
        b["refresh"] = gr.Button("Reload Queue", elem_id="traintrain_refresh_queue")
    table, items = ui.queue_view()
    w["queue_table"] = gr.Dataframe(value=table, headers=TABLE_HEADERS, interactive=False, wrap=True,
                                    label="Queue", elem_id="traintrain_queue_table")
    with gr.Row():
        w["queue_item"] = gr.Dropdown(choices=items["choices"], value=None, label="Queue item",
                                      elem_id="traintrain_queue_item")
        b["delete"] = gr.Button("Delete item", elem_id="traintrain_delete_item")
        b["requeue"] = gr.Button("Run again (set pending)", elem_id="traintrain_requeue_item")
        b["clear"] = gr.Button("Delete finished items", elem_id="traintrain_clear_finished")
    return b


def _plot_tab(ui: TrainTrainUI, w: dict) -> dict:
    b = {}
    with gr.Row():
        w["log"] = gr.Dropdown(choices=ui.log_choices(), value=NEWEST_LOG, label="Log file (under logs/)",
                               elem_id="traintrain_log")
        w["smoothing"] = gr.Slider(minimum=0, maximum=0.99, value=0.6, step=0.01, label="Smoothing",
                                   info="Exponential moving average of the loss; 0 = raw values.",
                                   elem_id="traintrain_smoothing")
    with gr.Row():
        b["refresh"] = gr.Button("Refresh list", elem_id="traintrain_refresh_logs")
        b["draw"] = gr.Button("Reload Plot", variant="primary", elem_id="traintrain_draw_plot")
    w["plot_message"] = gr.Textbox(label="Message", lines=1, interactive=False, elem_id="traintrain_plot_message")
    w["plot"] = gr.Plot(label="Training Result", elem_id="traintrain_plot")
    return b


def _image_tab(ui: TrainTrainUI, w: dict) -> dict:
    """The augmentation helper (SPEC.md §10): rotated / shrunk / mirrored copies of images."""
    b = {}
    gr.Markdown("Makes rotated, shrunk and mirrored copies of training images, named `<name>_id_<n>`, "
                "with their caption files. A file that exists is never replaced.")
    with gr.Row():
        w["aug_dir"] = gr.Textbox(label="Image directory", lines=1, scale=3, elem_id="traintrain_aug_dir",
                                  info="From Directory copies every image directly in this folder.")
        w["aug_out"] = gr.Textbox(label="Output directory", lines=1, scale=3, elem_id="traintrain_aug_out",
                                  info="Blank: next to the originals (From Directory); From File needs one.")
        w["aug_name"] = gr.Textbox(label="Output name", lines=1, scale=2, elem_id="traintrain_aug_name",
                                   info="From File: copies are NAME_id_0.png, NAME_id_1.png, ... (blank: the file's name).")
    w["aug_image"] = gr.Image(type="filepath", image_mode="RGBA", label="Image (From File)",
                              elem_id="traintrain_aug_image")
    with gr.Row():
        w["aug_count"] = gr.Slider(minimum=1, maximum=1000, value=5, step=1, label="number of images",
                                   elem_id="traintrain_aug_count")
        w["aug_angle"] = gr.Slider(minimum=0, maximum=180, value=180, step=1, label="max tilting angle",
                                   elem_id="traintrain_aug_angle")
        w["aug_scale"] = gr.Slider(minimum=0.05, maximum=1, value=0.4, step=0.01, label="minimum downscale ratio",
                                   elem_id="traintrain_aug_scale")
    with gr.Row():
        w["aug_change_angle"] = gr.Checkbox(value=True, label="change angle", elem_id="traintrain_aug_change_angle")
        w["aug_change_scale"] = gr.Checkbox(value=True, label="change scale", elem_id="traintrain_aug_change_scale")
        w["aug_mirror"] = gr.Checkbox(value=False, label="mirror every other copy", elem_id="traintrain_aug_mirror")
        w["aug_side"] = gr.Dropdown(choices=list(AUGMENT_SIDES), value="none", label="fix side",
                                    elem_id="traintrain_aug_side")
    with gr.Row():
        b["dir"] = gr.Button("From Directory", variant="primary", elem_id="traintrain_aug_from_dir")
        b["file"] = gr.Button("From File", elem_id="traintrain_aug_from_file")
    w["aug_message"] = gr.Textbox(label="Message", lines=2, interactive=False, elem_id="traintrain_aug_message")
    return b


def _wire(demo: gr.Blocks, ui: TrainTrainUI, w: dict, train: dict, queue: dict, plots: dict,
          images: dict) -> None:
    form = [w[name] for name in ui_form.FIELD_NAMES]
    loaded = [w[name] for name in LOADED_FIELDS] + [w["message"]]
    current_model = [w["model"], w["model_path"], w["vae"]]
    view = [w["queue_table"], w["queue_item"]]
    visibility = [w[p.name] for p in ui_form.PASS1] + [w["ileco_group"], w["images_group"], w["pass2_group"]]

    w["mode"].change(ui.change_mode, [w["mode"]], visibility)
    shown = [w["progress"], w["message"], w["previews"]]
    train["start"].click(ui.start_shown, [w["resume"], *form], shown, api_name="traintrain_start",
                         show_progress="hidden")
    train["stop"].click(ui.stop, [], [w["progress"]], api_name="traintrain_stop")
    train["save_now"].click(ui.save_now, [], [w["progress"]], api_name="traintrain_save_now")
    train["follow"].click(ui.follow_shown, [], shown, show_progress="hidden")
    train["demo"].click(ui.start_demo_shown, [], shown, show_progress="hidden")
    for which in ("Original", "Target", "All"):
        train[f"gen_{which.lower()}"].click(_bound(ui.generate, which), form, [w["generated"], w["message"]],
                                           api_name=f"traintrain_generate_{which.lower()}")
    train["queue"].click(ui.add_to_queue, form, [w["message"], *view], api_name="traintrain_add_queue")
    train["save"].click(ui.save_preset, [w["preset_overwrite"], *form],
                        [w["message"], w["preset"], w["preset_overwrite"]], api_name="traintrain_save_preset")
    blocks = [w["network_blocks"], w[ui_form.P2 + "network_blocks"]]
    for button, handler, name, api in ((train["load"], ui.load_preset, "preset", "traintrain_load_preset"),
                                       (train["load_json"], ui.load_json, "json_name", "traintrain_load_json")):
        # then the block ids the loaded settings hold are fitted to the chosen model's family
        button.click(handler, [w[name], *current_model], loaded, api_name=api).then(
            ui.blocks_for_model, [w["model"], w["model_path"], *blocks], blocks)
    train["refresh_presets"].click(ui.refresh_presets, [], [w["preset"]])
    train["refresh_models"].click(ui.refresh_models, [], [w["model"], w["vae"]])
    train["copy"].click(ui.copy_first_pass, [w[p.name] for p in ui_form.PASS2],
                        [w[ui_form.P2 + p.name] for p in ui_form.PASS2])

    queue["run"].click(ui.run_queue, [], [w["queue_progress"], w["queue_message"], *view],
                       api_name="traintrain_run_queue", show_progress="hidden")
    queue["stop"].click(ui.stop, [], [w["queue_progress"]])
    queue["refresh"].click(ui.queue_view, [], view)
    queue["delete"].click(ui.delete_item, [w["queue_item"]], [w["queue_message"], *view])
    queue["requeue"].click(ui.requeue_item, [w["queue_item"]], [w["queue_message"], *view])
    queue["clear"].click(ui.clear_finished, [], [w["queue_message"], *view])

    plots["refresh"].click(ui.refresh_logs, [], [w["log"]])
    plots["draw"].click(ui.draw_plot, [w["log"], w["smoothing"]], [w["plot"], w["plot_message"]],
                        api_name="traintrain_plot")

    options = [w[n] for n in ("aug_count", "aug_change_angle", "aug_angle", "aug_change_scale", "aug_scale",
                              "aug_side", "aug_mirror")]
    images["dir"].click(ui.augment_folder, [w["aug_dir"], w["aug_out"], *options], [w["aug_message"]],
                        api_name="traintrain_augment_folder")
    images["file"].click(ui.augment_file, [w["aug_image"], w["aug_out"], w["aug_name"], *options],
                         [w["aug_message"]], api_name="traintrain_augment_file")

    # A page (re)loaded shows what is true now, not what was true when the server started: the
    # remembered model, the queue file, the logs, and the run going on.
    w["model"].change(ui.remember_model, [w["model"]], [])
    # the block checkboxes list the chosen model's family's ids (Flux.1 / Z-Image: their own blocks)
    for chosen in (w["model"], w["model_path"]):
        chosen.change(ui.blocks_for_model, [w["model"], w["model_path"], *blocks], blocks)
    demo.load(ui.page_load, [], [w["model"], *view, w["log"]]).then(  # the family of the model shown at load
        ui.blocks_for_model, [w["model"], w["model_path"], *blocks], blocks)
    demo.load(ui.follow_at_load_shown, [], [w["progress"], w["message"], w["previews"]], show_progress="hidden")


def _bound(fn, first):
    """``fn`` with its first argument fixed (a plain function: gradio reads the handler's signature)."""
    def handler(*args):
        return fn(first, *args)
    return handler


def page_css() -> str:
    """style.css of the extension ('' when missing); web-UIs load it themselves."""
    css = ROOT / "style.css"
    return css.read_text(encoding="utf-8") if css.is_file() else ""


def build_ui(host, *, standalone: bool, paths: UiPaths | None = None, output_dir: Path | None = None,
             poll_s: float = 0.5, allowed_dirs=None) -> gr.Blocks:
    """The whole page for ``host``. The handlers' object is ``blocks.traintrain`` (a TrainTrainUI);
    ``allowed_dirs``: the only folders Load JSON reads from (None: any)."""
    ui = TrainTrainUI(host, standalone=standalone, paths=paths, output_dir=output_dir, poll_s=poll_s,
                      allowed_dirs=allowed_dirs)
    w: dict = {}
    with ui_compat.blocks(css=page_css() if standalone else None) as demo:
        with gr.Column(elem_id="traintrain_tab"):
            if standalone:
                gr.Markdown("# TrainTrain", elem_id="traintrain_title")
            with gr.Tabs(elem_id="traintrain_tabs"):
                with gr.Tab("Train", elem_id="traintrain_train_tab"):
                    train = _train_tab(ui, w)
                with gr.Tab("Queue", elem_id="traintrain_queue_tab"):
                    queue = _queue_tab(ui, w)
                with gr.Tab("Plot", elem_id="traintrain_plot_tab"):
                    plots = _plot_tab(ui, w)
                with gr.Tab("Image", elem_id="traintrain_image_tab"):
                    images = _image_tab(ui, w)
        _wire(demo, ui, w, train, queue, plots, images)
    demo.traintrain = ui
    demo.traintrain_widgets = w
    return demo

