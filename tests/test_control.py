"""The one control channel of a run (trainer/training/control.py): commands in, callbacks out."""

from __future__ import annotations

import logging

import pytest
from safetensors.torch import load_file

from helpers import TinyHost, image_folder, quick_config
from trainer.training.control import TrainControl
from trainer.training.job import run_job


def test_listeners_are_called_and_removed_and_a_save_request_is_taken_once():
    control = TrainControl()
    events, lines, previews = [], [], []
    remove = control.listen(on_progress=events.append, on_log=lines.append,
                            on_preview=lambda step, paths: previews.append((step, paths)))
    control.progress("e1")
    control.log("hello")
    control.preview(4, ("a.png",))
    remove()
    control.progress("e2")
    assert events == ["e1"] and lines == ["hello"] and previews == [(4, ["a.png"])]
    order = []
    control.listen(on_progress=lambda e: order.append("caller"))
    control.listen(on_progress=lambda e: order.append("host"), first=True)  # a host's own display goes first
    control.progress("e3")
    assert order == ["host", "caller"]

    assert not control.take_save_request()
    control.save_now()
    assert control.take_save_request() and not control.take_save_request()
    assert not control.stop_requested
    pressed = []
    leave = control.watch(lambda: bool(pressed))  # a host's Interrupt, asked when the loop checks
    assert not control.stop_requested
    pressed.append(True)
    assert control.stop_requested
    leave()
    other = TrainControl()
    other.stop()
    assert other.stop_requested


def test_messages_without_a_log_listener_go_to_the_trainer_logger(caplog):
    with caplog.at_level(logging.INFO, logger="trainer"):
        TrainControl().log("nobody listens")
    assert "nobody listens" in caplog.text


class FollowingHost(TinyHost):
    """A host with its own progress display and an Interrupt (as a web UI has)."""

    def __init__(self, out, interrupt_at: int | None = None):
        super().__init__("sd1", out)
        self.interrupt_at, self.shown, self.left = interrupt_at, [], 0

    def follow(self, control):
        def show(event):
            self.shown.append(event.step)
            if event.step == self.interrupt_at and not event.message:
                control.stop()  # the host's own Interrupt

        remove = control.listen(on_progress=show)

        def leave():
            self.left += 1
            remove()

        return leave


@pytest.mark.slow
def test_save_now_saves_the_step_and_training_goes_on(tmp_path):
    data = image_folder(tmp_path / "data", n=2)
    control, lines = TrainControl(), []

    def ask_at_2(event):
        if event.step == 2 and not event.message:
            control.save_now()

    control.listen(on_progress=ask_at_2, on_log=lines.append)
    host = FollowingHost(tmp_path / "out")
    result = run_job(quick_config(lora_data_directory=str(data), train_iterations="4", save_lora_name="now"),
                     host=host, control=control, logs_dir=tmp_path / "logs")
    assert not result.stopped and result.steps == 4
    assert result.saved == [tmp_path / "out" / "now_2steps.safetensors", tmp_path / "out" / "now.safetensors"]
    assert load_file(str(result.saved[0])).keys() == load_file(str(result.saved[1])).keys()
    assert any("now_2steps.safetensors (step 2); training goes on" in line for line in lines)
    # the host saw every step through the same control, and left it when the run ended
    assert [s for s in host.shown if s] == [1, 2, 3, 4] and host.left == 1
    control.progress(type("E", (), {"step": 9, "message": ""})())
    assert 9 not in host.shown


@pytest.mark.slow
def test_a_hosts_interrupt_stops_the_run_through_the_control(tmp_path):
    data = image_folder(tmp_path / "data", n=2)
    host = FollowingHost(tmp_path / "out", interrupt_at=1)
    result = run_job(quick_config(lora_data_directory=str(data), train_iterations="3", save_lora_name="cut"),
                     host=host, logs_dir=tmp_path / "logs")
    assert result.stopped and result.steps == 1
    assert result.saved == [tmp_path / "out" / "cut_1steps.safetensors"] and host.left == 1
