"""``python -m trainer demo``: a first run without a model, on the tiny model the package builds."""

from __future__ import annotations

import pytest

from trainer.cli import main
from trainer.training.control import TrainControl
from trainer.training.demo import run_demo

pytest.importorskip("peft")


def test_a_short_demo_trains_saves_checks_plots_and_says_where_everything_is(tmp_path):
    seen = []
    control = TrainControl(on_preview=lambda step, paths: seen.append(step))
    result = run_demo(tmp_path / "demo", steps=4, control=control)
    assert result.file == tmp_path / "demo" / "output" / "demo.safetensors" and result.file.is_file()
    assert result.load_check.ok and result.load_check.modules == 84
    assert [p.name for p in result.previews] == ["step_1.png", "step_2.png", "step_3.png", "step_4.png"]
    assert seen == [1, 2, 3, 4]
    assert result.csv.is_file()
    lines = "\n".join(result.lines())
    for thing in (result.file, result.previews[-1].parent, "loaded: 84 modules, 0 keys unmatched"):
        assert str(thing) in lines
    if result.plot is not None:  # matplotlib and pandas present
        assert result.plot.is_file() and str(result.plot) in lines


def test_the_demo_command_never_writes_into_a_folder_that_has_files(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep", encoding="utf-8")
    assert main(["demo", "--folder", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_the_standalone_page_offers_a_demo_run_only_when_no_model_is_found(tmp_path):
    from helpers import TinyHost
    from test_ui import ListingHost

    from trainer.ui.actions import UiPaths
    from trainer.ui.page import build_ui

    bare = build_ui(TinyHost("sd1", tmp_path / "out"), standalone=True, paths=UiPaths.under(tmp_path))
    assert bare.traintrain_widgets is not None
    buttons = {b.elem_id: b for b in bare.blocks.values() if getattr(b, "elem_id", None) == "traintrain_demo"}
    assert buttons["traintrain_demo"].visible
    listed = build_ui(ListingHost("sd1", tmp_path / "out"), standalone=True, paths=UiPaths.under(tmp_path))
    assert not [b for b in listed.blocks.values() if getattr(b, "elem_id", None) == "traintrain_demo" and b.visible]


@pytest.mark.slow
def test_the_page_runs_the_demo_in_the_background_with_its_previews(tmp_path):
    from helpers import TinyHost

    from trainer.ui.actions import UiPaths
    from trainer.ui.page import build_ui

    runner = build_ui(TinyHost("sd1", tmp_path / "out"), standalone=True, paths=UiPaths.under(tmp_path)).traintrain.runner
    assert runner.start_demo(tmp_path / "demo", steps=2) is None
    snap = runner.wait(300)
    assert "trained LoRA:" in snap.message and "0 keys unmatched" in snap.message
    assert [step for _, step in runner.previews()] == [1, 2]
