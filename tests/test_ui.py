"""The Train/Queue/Plot page built from the schema, and its handlers called as plain functions."""

from __future__ import annotations

import json
import time
from pathlib import Path

import gradio as gr
import pytest

from helpers import TinyHost, image_folder, pattern_image
from trainer.ui import form as ui_form
from trainer.config import PARAMS
from trainer.ui.page import build_ui
from trainer.ui.actions import LOADED_FIELDS, TrainTrainUI, UiPaths


class ListingHost(TinyHost):
    """TinyHost with model lists, as the standalone and web-UI hosts have."""

    def list_models(self):
        return ["tiny-sd1", "other.safetensors"]

    def list_vaes(self):
        return ["vae.pt"]


class SlowHost(ListingHost):
    """Slows each step a little, so progress can be seen between steps."""

    def follow(self, control):
        return control.listen(on_progress=lambda event: time.sleep(0.15))


@pytest.fixture
def page(tmp_path):
    demo = build_ui(ListingHost("sd1", tmp_path / "out"), standalone=True, paths=UiPaths.under(tmp_path),
                    output_dir=tmp_path / "out", poll_s=0.05)
    return demo


def _args(**changes):
    values = ui_form.default_values()
    values.update(model="tiny-sd1", original_image=None, target_image=None)
    values.update(changes)
    return [values[name] for name in ui_form.FIELD_NAMES]


def _quick(data, **changes):
    quick = {"image_size": "64", "image_min_length": "64", "image_buckets_step": "64", "train_iterations": "3",
             "train_batch_size": "1", "network_rank": "4", "network_alpha": "4", "train_model_precision": "fp32",
             "save_precision": "fp32", "train_seed": "1", "train_lr_scheduler": "constant",
             "lora_data_directory": str(data), "save_lora_name": "ui_job"}
    return _args(**{**quick, **changes})


def test_page_has_a_widget_per_parameter_with_key_label_help_and_prefixed_ids(page):
    widgets = page.traintrain_widgets
    for p in PARAMS:
        widget = widgets[p.name]
        assert widget.label == p.key.replace("_", " ")
        assert widget.info == p.help
    assert widgets["image_size"].label == "image size(height, width)"
    assert widgets["2nd:network_type"].elem_id == "traintrain_p2_network_type"
    ids = [b.elem_id for b in page.blocks.values() if getattr(b, "elem_id", None)]
    assert len(ids) > 150 and all(i.startswith("traintrain_") for i in ids)
    assert len(set(ids)) == len(ids)
    assert widgets["model"].value == "tiny-sd1"


def test_mode_switch_only_toggles_visibility(page):
    ui = page.traintrain
    names = [p.name for p in ui_form.PASS1]

    def visible(mode):
        updates = ui.change_mode(mode)
        assert all(set(u) <= {"__type__", "visible"} for u in updates)  # values are never touched
        shown = dict(zip(names + ["ileco", "images", "pass2"], (u["visible"] for u in updates)))
        return shown

    lora, ileco, diff, addift = visible("LoRA"), visible("iLECO"), visible("Difference"), visible("ADDifT")
    assert lora["lora_data_directory"] and not ileco["lora_data_directory"]
    assert (lora["ileco"], ileco["ileco"], diff["ileco"]) == (False, True, False)
    assert (lora["images"], diff["images"], addift["images"]) == (False, True, True)
    assert (lora["pass2"], diff["pass2"], addift["pass2"]) == (False, True, False)
    assert all(v["train_iterations"] for v in (lora, ileco, diff, addift))
    assert ileco["network_train_text_encoder"] and not lora["network_train_text_encoder"]
    assert addift["diff_alt_ratio"] and not lora["diff_alt_ratio"]


def test_preset_round_trip_keeps_the_model(page, tmp_path):
    ui = page.traintrain
    message, dropdown, _ = ui.save_preset(False, *_args(mode="iLECO", save_lora_name="round", network_rank="8",
                                                        original_prompt="a cat", model="tiny-sd1"))
    assert message.startswith("Preset saved: ") and dropdown["value"] == "round"
    saved = json.loads((tmp_path / "jsons" / "presets" / "round.json").read_text(encoding="utf-8"))
    assert saved["mode"] == "iLECO" and saved["network_rank"] == "8" and saved["model"] == "tiny-sd1"
    assert "original image" not in saved and "negative prompt" not in saved

    out = dict(zip(LOADED_FIELDS + ("message",), ui.load_preset("round", "other.safetensors", "", "None")))
    assert out["model"] == "tiny-sd1" and out["model_path"] == ""
    assert (out["mode"], out["network_rank"], out["original_prompt"]) == ("iLECO", "8", "a cat")

    # Shipped presets hold "model": "", which must not blank the current choice (the reference did).
    saved["model"] = ""
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "blank.json").write_text(json.dumps(saved), encoding="utf-8")
    out = dict(zip(LOADED_FIELDS + ("message",), ui.load_preset("blank", "other.safetensors", "/my/path", "vae.pt")))
    assert (out["model"], out["model_path"], out["vae"]) == ("other.safetensors", "/my/path", "vae.pt")

    # A model that is not in the list goes into the path field.
    saved["model"] = "/elsewhere/m.safetensors"
    (tmp_path / "presets" / "path.json").write_text(json.dumps(saved), encoding="utf-8")
    out = dict(zip(LOADED_FIELDS + ("message",), ui.load_preset("path", "tiny-sd1", "", "None")))
    assert (out["model"], out["model_path"]) == ("tiny-sd1", "/elsewhere/m.safetensors")

    out = ui.load_preset("missing", "tiny-sd1", "", "None")
    assert "missing.json: file not found" in out[-1] and all(u == gr.update() for u in out[:-1])


def test_load_json_searches_jsons_and_reports_bad_values(page, tmp_path):
    ui = page.traintrain
    (tmp_path / "jsons" / "20260101").mkdir(parents=True)
    mine = tmp_path / "jsons" / "20260101" / "mine.json"
    mine.write_text(json.dumps({"train_iterations": "77"}), encoding="utf-8")
    (tmp_path / "jsons" / "bad.json").write_text(json.dumps({"train_iterations": "many"}), encoding="utf-8")
    out = dict(zip(LOADED_FIELDS + ("message",), ui.load_json("mine", "tiny-sd1", "", "None")))
    assert out["train_iterations"] == "77" and out["model"] == "tiny-sd1"
    assert 'train_iterations: "many" is not allowed' in ui.load_json("bad", "tiny-sd1", "", "None")[-1]
    assert "nothing.json not found" in ui.load_json("nothing", "tiny-sd1", "", "None")[-1]


def _events(demo) -> list:
    """The page's event handlers (gradio 4+: BlockFunction objects with fn, inputs, outputs)."""
    return list(demo.fns.values() if isinstance(demo.fns, dict) else demo.fns)


def test_copy_from_first_pass_copies_everything_and_keeps_the_switch(page):
    """The button's event, as the page wires it, reads every 1st-pass widget and writes the
    2nd-pass widget of the same setting (network_type included), and never the 2nd-pass switch."""
    widgets = page.traintrain_widgets
    [event] = [e for e in _events(page) if getattr(e.fn, "__name__", "") == "copy_first_pass"]
    assert [page.blocks[target].elem_id for target, _ in event.targets] == ["traintrain_copy_1st_pass"]
    names = [p.name for p in ui_form.PASS2]
    assert "network_type" in names and "use_2nd_pass_settings" not in names
    assert [id(c) for c in event.inputs] == [id(widgets[n]) for n in names]
    assert [id(c) for c in event.outputs] == [id(widgets[ui_form.P2 + n]) for n in names]
    assert id(widgets["use_2nd_pass_settings"]) not in {id(c) for c in event.outputs}
    # run the handler on a page whose 1st pass differs from the defaults: the 2nd pass gets it all
    first = {p.name: ui_form.ui_value(p, p.default) for p in ui_form.PASS2}
    first.update(network_type="loha", network_rank="32", train_learning_rate="3e-4")
    written = dict(zip((c.elem_id for c in event.outputs), event.fn(*[first[n] for n in names])))
    assert written == {widgets[ui_form.P2 + n].elem_id: first[n] for n in names}


def test_difference_form_carries_the_second_pass_and_kept_image_copies(page, tmp_path):
    ui = page.traintrain
    a, b = pattern_image(tmp_path / "a.png", 1), pattern_image(tmp_path / "b.png", 2)
    args = _args(mode="Difference", original_image=str(a), target_image=str(b), use_2nd_pass_settings=True,
                 **{"2nd:network_rank": "4", "2nd:network_type": "c3lier"})
    config = ui._config(tuple(args))
    assert config.use_2nd_pass_settings and config.pass2().network_rank == 4
    assert config.pass2().network_type == "c3lier" and config.network_type == "lierla"
    kept = tmp_path / "logs" / "inputs"
    assert config.original_image.startswith(str(kept)) and config.target_image.startswith(str(kept))
    assert Path(config.original_image).read_bytes() == a.read_bytes()


@pytest.mark.slow
def test_start_runs_in_the_background_and_shows_progress(tmp_path):
    data = image_folder(tmp_path / "data", n=2)
    demo = build_ui(SlowHost("sd1", tmp_path / "out"), standalone=True, paths=UiPaths.under(tmp_path),
                    output_dir=tmp_path / "out", poll_s=0.05)
    ui = demo.traintrain
    assert list(ui.follow()) == [("Nothing is training.", gr.update())]
    seen = list(ui.start(False, *_quick(data, logging_save_csv=True)))
    progress, message = seen[-1]
    saved, check = message.splitlines()  # the file, then the load check of it
    assert saved.startswith("Finished: saved ") and saved.endswith("ui_job.safetensors")
    assert check.startswith("load check of ui_job.safetensors") and "0 keys unmatched" in check
    assert (tmp_path / "out" / "ui_job.safetensors").is_file()
    assert any("step 2/3" in p and "loss" in p for p, _ in seen), seen
    assert len(seen) > 3  # the handler reported while training ran
    # While it trains, the Message box says so (it was empty); each text is sent once, not every poll.
    assert seen[0][1].startswith("Training ui_job (LoRA), started ") and "Stop and Save" in seen[0][1]
    assert not any("main: main:" in p for p, _ in seen if isinstance(p, str)), seen
    texts = [m for _, m in seen if isinstance(m, str)]
    assert texts.count(seen[0][1]) == 1 and set(texts) == {seen[0][1], message}, texts
    # "Show progress" (e.g. after a page reload) shows the last run's state.
    assert list(ui.follow()) == [seen[-1]] and "step 3/3" in seen[-1][0] and progress.endswith("(finished)")

    fig, note = ui.draw_plot("(newest)", 0.5)
    assert note.startswith("Showing ") and "ui_job" in note and fig.axes[0].get_lines()


@pytest.mark.slow
def test_stop_ends_a_running_job_saves_it_and_resume_finishes_it(tmp_path):
    data = image_folder(tmp_path / "data", n=2)
    demo = build_ui(SlowHost("sd1", tmp_path / "out"), standalone=True, paths=UiPaths.under(tmp_path),
                    output_dir=tmp_path / "out", poll_s=0.05)
    ui = demo.traintrain
    assert ui.stop() == "Nothing is training."
    form = _quick(data, train_iterations="8", save_lora_name="long")
    follow = ui.start(False, *form)
    for progress, _ in follow:
        if "step 2/8" in progress:
            break
    assert ui.start(False, *_quick(data)).__next__()[1].startswith("A training run is going already")
    assert ui.stop() == "Stopping..."
    *_, (progress, message) = follow
    assert message.startswith("Stopped at step ") and "long_" in message and "tick 'resume" in message
    assert "--resume" not in message  # a CLI flag means nothing on the page
    assert progress.startswith("long (LoRA) — main: step ") and progress.endswith("(stopped)")
    assert list((tmp_path / "out").glob("long_*steps.safetensors"))

    *_, (progress, message) = ui.start(True, *form)
    saved, check = message.splitlines()
    assert saved.startswith("Finished: saved ") and saved.endswith("long.safetensors") and "0 keys unmatched" in check
    assert "step 8/8" in progress


def test_start_reports_bad_settings_at_once(page):
    [(progress, message)] = list(page.traintrain.start(False, *_args(train_iterations="many")))
    assert message.startswith("Error: train_iterations: \"many\" is not allowed")


@pytest.mark.slow
def test_queue_handlers(page, tmp_path):
    ui = page.traintrain
    data = image_folder(tmp_path / "data", n=2)
    message, table, items = ui.add_to_queue(*_quick(data, save_lora_name="q1"))
    assert message == "Added to Queue: item 1 ('q1', LoRA)"
    message, table, items = ui.add_to_queue(*_quick(data, save_lora_name="q1", network_rank="8"))
    assert message.startswith("Duplicated LoRA name! Could not add to queue")
    ui.add_to_queue(*_quick(data, save_lora_name="q2"))
    message, table, items = ui.delete_item("1: q1 (pending)")
    assert message == "Deleted: item 1 ('q1')"
    assert [row[1] for row in table] == ["q2"] and items["choices"] == ["2: q2 (pending)"]
    *_, (progress, message, table, items) = ui.run_queue()
    assert message == "[2] q2: Finished: saved " + str(tmp_path / "out" / "q2.safetensors")
    assert table[0][4] == "done"
    assert ui.run_queue().__next__()[1] == "Nothing to run: the queue has no pending items."


def test_plot_without_logs_says_so(page):
    fig, message = page.traintrain.draw_plot("(newest)", 0.6)
    assert fig is None and message.startswith("Error: no CSV logs in")


@pytest.mark.slow
def test_ui_command_serves_the_standalone_page_and_trains_a_model_folder(tmp_path, monkeypatch):
    """``python -m trainer ui --models-dir D`` lists D's models and a run trains the chosen one."""
    from tiny import save_tiny_diffusers
    from trainer.ui import compat as ui_compat
    from trainer.cli import main

    save_tiny_diffusers("sd1", tmp_path / "models" / "StableDiffusion" / "tiny")
    monkeypatch.setattr(UiPaths, "default", classmethod(lambda cls: UiPaths.under(tmp_path)))
    served = {}
    monkeypatch.setattr(ui_compat, "launch", lambda demo, **kwargs: served.update(demo=demo, **kwargs))
    out = tmp_path / "out"
    assert main(["ui", "--models-dir", str(tmp_path / "models"), "--output-dir", str(out), "--port", "7999"]) == 0
    assert (served["server_name"], served["server_port"]) == ("127.0.0.1", 7999)
    assert "#traintrain_tab" in served["css"]
    demo = served["demo"]
    model = demo.traintrain_widgets["model"]
    assert [c[0] if isinstance(c, tuple) else c for c in model.choices] == ["tiny"] and model.value == "tiny"

    data = image_folder(tmp_path / "data", n=2)
    *_, (progress, message) = demo.traintrain.start(False, *_quick(data, model="tiny", save_lora_name="folder"))
    assert message.splitlines()[0] == f"Finished: saved {out / 'folder.safetensors'}"
    assert "load check of folder.safetensors" in message and "0 keys unmatched" in message


def _webui_page(tmp_path, host=None):
    return build_ui(host or ListingHost("sd1", tmp_path / "out"), standalone=False, paths=UiPaths.under(tmp_path),
                    output_dir=tmp_path / "out", poll_s=0.05)


def _choices(widget):
    return [c[0] if isinstance(c, (tuple, list)) else c for c in widget.choices]


def test_webui_model_list_starts_with_the_loaded_model_saved_as_blank(tmp_path):
    demo = _webui_page(tmp_path)
    ui, model = demo.traintrain, demo.traintrain_widgets["model"]
    assert _choices(model) == [ui_form.LOADED_MODEL, "tiny-sd1", "other.safetensors"]
    assert model.value == ui_form.LOADED_MODEL
    config = ui._config(tuple(_args(model=ui_form.LOADED_MODEL)))
    assert config.model == ""  # what the web-UI host reads as "train on the loaded model"

    ui.save_preset(False, *_args(model=ui_form.LOADED_MODEL, save_lora_name="blank"))
    saved = json.loads((tmp_path / "jsons" / "presets" / "blank.json").read_text(encoding="utf-8"))
    assert saved["model"] == ""
    for blank in ("", "None"):
        saved["model"] = blank
        (tmp_path / "jsons" / "presets" / "blank.json").write_text(json.dumps(saved), encoding="utf-8")
        out = dict(zip(LOADED_FIELDS + ("message",), ui.load_preset("blank", ui_form.LOADED_MODEL, "", "None")))
        assert (out["model"], out["model_path"]) == (ui_form.LOADED_MODEL, "")

    data = image_folder(tmp_path / "data", n=2)
    _, table, _ = ui.add_to_queue(*_quick(data, model=ui_form.LOADED_MODEL))
    assert table[0][3] == ui_form.LOADED_MODEL

    # The standalone page has no loaded model: no such entry, the first model is the default.
    page = build_ui(ListingHost("sd1", tmp_path / "out"), standalone=True, paths=UiPaths.under(tmp_path / "s"))
    assert _choices(page.traintrain_widgets["model"]) == ["tiny-sd1", "other.safetensors"]
    assert page.traintrain_widgets["model"].value == "tiny-sd1"


@pytest.mark.slow
def test_the_model_choice_is_remembered_across_reloads_and_new_models(tmp_path):
    class Growing(ListingHost):
        models = ["b.safetensors"]

        def list_models(self):
            return list(self.models)

    host = Growing("sd1", tmp_path / "out")
    ui = _webui_page(tmp_path, host).traintrain
    ui.remember_model("b.safetensors")
    host.models = ["a_new.safetensors", "b.safetensors"]  # a new model sorts first
    demo = _webui_page(tmp_path, host)
    assert demo.traintrain_widgets["model"].value == "b.safetensors"
    model_update = demo.traintrain.page_load()[0]
    assert model_update["value"] == "b.safetensors" and model_update["choices"][0] == ui_form.LOADED_MODEL
    ui.remember_model("not listed")  # ignored
    host.models = ["a_new.safetensors"]  # the remembered one is gone: back to the default
    assert _webui_page(tmp_path, host).traintrain.page_load()[0]["value"] == ui_form.LOADED_MODEL
    # Starting a run remembers the model it trains.
    standalone = build_ui(host, standalone=True, paths=UiPaths.under(tmp_path / "s"), output_dir=tmp_path / "out")
    list(standalone.traintrain.start(False, *_args(model="a_new.safetensors", train_iterations="many")))
    assert standalone.traintrain.default_model(["x", "a_new.safetensors"]) == "a_new.safetensors"


def _load_events(demo) -> list[set]:
    """The output ids of every page-load event (gradio 3: trigger 'load'; 4+: targets (id, 'load'))."""
    found = []
    for dep in demo.config["dependencies"]:
        targets = dep.get("targets") or []
        if dep.get("trigger") == "load" or any(isinstance(t, (list, tuple)) and t[1] == "load" for t in targets):
            found.append(set(dep["outputs"]))
    return found


def test_a_loaded_page_shows_the_queue_file_logs_and_model_of_now(tmp_path):
    demo = _webui_page(tmp_path)
    w, ui = demo.traintrain_widgets, demo.traintrain
    # Written after the page was built (another program, or an earlier server): the page load shows them.
    from trainer.training.queue import JobQueue

    data = image_folder(tmp_path / "data", n=2)
    JobQueue(tmp_path / "jsons" / "queue.json").add(ui._config(tuple(_quick(data, save_lora_name="later"))))
    (tmp_path / "logs" / "20260101").mkdir(parents=True)
    (tmp_path / "logs" / "20260101" / "later.csv").write_text("Step,Loss\n1,0.5\n", encoding="utf-8")
    model, table, items, log = ui.page_load()
    assert table[0][1] == "later" and items["choices"] == ["1: later (pending)"]
    assert "20260101/later.csv" in log["choices"] and log["value"] == "(newest)"
    assert model["value"] == ui_form.LOADED_MODEL
    ids = {name: w[name]._id for name in ("model", "queue_table", "queue_item", "log", "progress", "message",
                                          "previews")}
    events = _load_events(demo)
    assert {ids["model"], ids["queue_table"], ids["queue_item"], ids["log"]} in events
    assert {ids["progress"], ids["message"], ids["previews"]} in events  # the preview gallery with the progress
    assert list(ui.follow_at_load()) == [(gr.update(), gr.update())]  # nothing ran: leave the boxes alone
    assert list(ui.follow_at_load_shown()) == [(gr.update(), gr.update(), [])]


def test_presets_are_saved_beside_the_shipped_ones_which_stay_untouched(page, tmp_path):
    ui = page.traintrain
    shipped = tmp_path / "presets" / "LoRA.json"
    shipped.parent.mkdir(parents=True)
    shipped.write_text(json.dumps({"mode": "LoRA", "network_rank": "16"}), encoding="utf-8")
    before = shipped.read_bytes()
    message, dropdown, box = ui.save_preset(False, *_args(save_lora_name="LoRA", network_rank="4"))
    mine = tmp_path / "jsons" / "presets" / "LoRA.json"
    assert shipped.read_bytes() == before and json.loads(mine.read_text(encoding="utf-8"))["network_rank"] == "4"
    assert message.startswith(f"Preset saved: {mine}") and "'LoRA (shipped)'" in message
    assert dropdown["choices"] == ["LoRA", "LoRA (shipped)"] and box is False
    load = dict(zip(LOADED_FIELDS + ("message",), ui.load_preset("LoRA (shipped)", "tiny-sd1", "", "None")))
    assert load["network_rank"] == "16"
    load = dict(zip(LOADED_FIELDS + ("message",), ui.load_preset("LoRA", "tiny-sd1", "", "None")))
    assert load["network_rank"] == "4"

    # Saving over a user preset needs the box ticked; the refusal says what it would replace.
    message, dropdown, box = ui.save_preset(False, *_args(save_lora_name="LoRA", network_rank="8"))
    assert message.startswith("Not saved: your preset 'LoRA' exists") and str(mine) in message
    assert dropdown == gr.update() and json.loads(mine.read_text(encoding="utf-8"))["network_rank"] == "4"
    message, _, box = ui.save_preset(True, *_args(save_lora_name="LoRA", network_rank="8"))
    assert "replaced your earlier preset" in message and box is False
    assert json.loads(mine.read_text(encoding="utf-8"))["network_rank"] == "8" and shipped.read_bytes() == before
    assert ui.preset_names() == ["LoRA", "LoRA (shipped)"]


def test_progress_tells_the_truth_about_failures_and_pass_names(tmp_path):
    from trainer.training.loop import ProgressEvent
    from trainer.ui.runner import describe_event

    assert describe_event(ProgressEvent("main", 0, 40, message="main: steps 0/40")) == "main: steps 0/40"
    assert describe_event(ProgressEvent("copy", 3, 40, message="stopped")) == "copy: stopped"
    demo = build_ui(SlowHost("sd1", tmp_path / "out"), standalone=True, paths=UiPaths.under(tmp_path),
                    output_dir=tmp_path / "out", poll_s=0.05)
    *_, (progress, message) = demo.traintrain.start(False, *_quick(tmp_path / "no_such_folder", save_lora_name="bad"))
    assert message.startswith("Error: ") and progress.startswith("bad (LoRA)")
    assert progress.endswith("failed") and "finished" not in progress


def test_bad_input_reaches_the_console_in_one_line(tmp_path):
    """A setting to fix is one line on the console (no traceback); a fault keeps its traceback."""
    from trainer.training.queue import JobQueue
    from trainer.ui.runner import Runner

    said = []
    runner = Runner(SlowHost("sd1", tmp_path / "out"), JobQueue(tmp_path / "queue.json"), output_dir=tmp_path / "out",
                    logs_dir=tmp_path / "logs", echo=said.append)
    config = ui_form.config_from_values(ui_form.values_of(tuple(_quick(tmp_path / "no_such_folder", save_lora_name="bad"))))
    assert runner.start_job(config) is None
    snapshot = runner.wait()
    assert snapshot.message.startswith("Error: ") and "no_such_folder" in snapshot.message
    assert len(said) == 1 and "Traceback" not in said[0] and "no_such_folder" in said[0]


@pytest.mark.slow
def test_a_reloaded_page_shows_the_live_run(tmp_path):
    data = image_folder(tmp_path / "data", n=2)
    demo = build_ui(SlowHost("sd1", tmp_path / "out"), standalone=True, paths=UiPaths.under(tmp_path),
                    output_dir=tmp_path / "out", poll_s=0.05)
    ui = demo.traintrain
    running = ui.start(False, *_quick(data, train_iterations="6", save_lora_name="live"))
    next(running)
    seen = list(ui.follow_at_load())  # a second page, loaded while the first one trains
    shown = [p for p, _ in seen if isinstance(p, str)]
    assert any("live (LoRA) — main: step" in p for p in shown), shown
    assert seen[-1][1].startswith("Finished: saved ") and shown[-1].endswith("(finished)")
    list(running)


@pytest.mark.slow
def test_requeue_answers_what_happens_next(page, tmp_path):
    ui = page.traintrain
    data = image_folder(tmp_path / "data", n=2)
    ui.add_to_queue(*_quick(data, save_lora_name="again"))
    list(ui.run_queue())
    message, table, items = ui.requeue_item("1: again (done)")
    assert message == "Pending again: item 1 ('again'); press Run queue to train it"
    assert table[0][4] == "pending" and items["choices"] == ["1: again (pending)"]
    assert ui.requeue_item(None)[0].startswith("Choose a queue item first")


@pytest.mark.slow
def test_ui_command_beyond_localhost_warns_takes_a_login_and_limits_load_json(tmp_path, monkeypatch, capsys):
    from trainer.ui import compat as ui_compat
    from trainer.cli import main

    monkeypatch.setattr(UiPaths, "default", classmethod(lambda cls: UiPaths.under(tmp_path)))
    served = {}
    monkeypatch.setattr(ui_compat, "launch", lambda demo, **kwargs: served.update(demo=demo, **kwargs))
    (tmp_path / "jsons").mkdir()
    (tmp_path / "jsons" / "ok.json").write_text(json.dumps({"train_iterations": "7"}), encoding="utf-8")
    elsewhere, extra = tmp_path / "elsewhere", tmp_path / "extra"
    for folder in (elsewhere, extra):
        folder.mkdir()
        (folder / "x.json").write_text(json.dumps({"train_iterations": "9"}), encoding="utf-8")

    assert main(["ui", "--host", "0.0.0.0", "--auth", "me:secret", "--allow-dir", str(extra)]) == 0
    assert served["server_name"] == "0.0.0.0" and served["auth"] == ("me", "secret")
    assert "Warning: the page listens on 0.0.0.0" in capsys.readouterr().err
    ui = served["demo"].traintrain
    assert ui.load_json("ok", "", "", "None")[-1].startswith("Loaded ")
    assert ui.load_json(str(extra / "x.json"), "", "", "None")[-1].startswith("Loaded ")
    refused = ui.load_json(str(elsewhere / "x.json"), "", "", "None")
    assert refused[-1].startswith(f"Error: {elsewhere / 'x.json'} is outside the folders")
    assert "--allow-dir" in refused[-1]
    assert all(u == gr.update() for u in refused[:-1])

    served.clear()
    assert main(["ui", "--host", "0.0.0.0"]) == 0
    err = capsys.readouterr().err
    assert "--auth USER:PASSWORD" in err and served["auth"] is None
    assert served["demo"].traintrain.load_json(str(elsewhere / "x.json"), "", "", "None")[-1].startswith("Error: ")
    assert main(["ui", "--auth", "nopassword"]) == 2
    assert "--auth takes USER:PASSWORD" in capsys.readouterr().err
    # On 127.0.0.1 without --allow-dir nothing is limited and nothing is printed.
    assert main(["ui"]) == 0 and "Warning" not in capsys.readouterr().err
    assert served["demo"].traintrain.load_json(str(elsewhere / "x.json"), "", "", "None")[-1].startswith("Loaded ")


def test_network_type_help_says_when_loha_cannot_train_here(monkeypatch):
    import sys

    from trainer.compat import install_command
    from trainer.config import param
    from trainer.ui.form import help_text

    p = param("network_type")
    assert help_text(p) == p.help  # lycoris-lora is installed here
    for name in [m for m in sys.modules if m == "lycoris" or m.startswith("lycoris.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lycoris", None)  # not installed
    text = help_text(p)
    assert text.startswith(p.help) and "loha is not available here" in text
    assert install_command("lycoris-lora>=3.0") in text and "lierla is not" not in text


def test_block_checkboxes_follow_the_chosen_models_family(tmp_path):
    """Choosing a Flux.1 or Z-Image file lists that family's block ids (ticked: every block but the text
    encoders, or the ticked ids the family has); an SD model (or one that cannot be read) lists BASE IN.. M00 OUT..."""
    import ldm
    from trainer.config.choices import BLOCKID26, FLUX_BLOCK_IDS, ZIMAGE_BLOCK_IDS
    from trainer.hosts.standalone import StandaloneHost

    models = tmp_path / "models" / "StableDiffusion"
    models.mkdir(parents=True)
    ldm.keys_file(models / "flux.safetensors", {"double_blocks.0.img_attn.norm.key_norm.scale": (128,)})
    ldm.keys_file(models / "zi.safetensors", {"context_refiner.0.attention.k_norm.weight": (128,)})
    ldm.keys_file(models / "sd.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": (4, 4, 3, 3),
                                              "cond_stage_model.transformer.text_model.embeddings.x": (768, 768)})
    ui = TrainTrainUI(StandaloneHost(tmp_path / "models"), standalone=True, paths=UiPaths.under(tmp_path))
    first, second = ui.blocks_for_model("flux.safetensors", "", list(BLOCKID26), ["BASE", "IN01"])
    assert first["choices"] == list(FLUX_BLOCK_IDS) == second["choices"]
    assert first["value"] == [b for b in FLUX_BLOCK_IDS if b not in ("CLIP", "T5")]
    zi, _ = ui.blocks_for_model("flux.safetensors", "zi.safetensors", ["S03", "D01", "QWEN3"], [])
    assert zi["choices"] == list(ZIMAGE_BLOCK_IDS) and zi["value"] == ["QWEN3", "S03"]
    for model in ("sd.safetensors", "missing.safetensors", ""):
        back, _ = ui.blocks_for_model(model, "", ["D00"], [])
        assert back["choices"] == list(BLOCKID26) and back["value"] == list(BLOCKID26)
