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
