"""CSV loss logs -> DataFrame and chart (loss on the left axis, learning rates on a twin axis)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from trainer.plot import LogError, find_logs, load_log, plot_log, resolve_log
from trainer.training.runlog import CsvLog

INFO = {"network_rank": 4, "network_alpha": 4, "train_learning_rate": 1e-3, "train_iterations": 6,
        "train_lr_scheduler": "cosine", "model_version": "sd1", "train_optimizer": "AdamW",
        "save_lora_name": "chart"}
LOSSES = [0.9, 0.7, 0.8, 0.5, 0.4, 0.45]


def _write_log(path):
    log = CsvLog(path, INFO, n_lrs=2)
    for step, loss in enumerate(LOSSES, start=1):
        log.row(step, 0, loss, loss * 0.9, [1e-3 / step, 2e-4], seconds=step * 0.5)
    log.close()
    return path


def _lines(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def test_load_log_finds_the_header_and_keeps_the_run_info(tmp_path):
    frame = load_log(_write_log(tmp_path / "a.csv"))
    assert list(frame.columns) == ["Step", "Epoch", "Loss", "Loss EMA", "Learning Rate 1", "Learning Rate 2", "Time"]
    assert frame["Step"].tolist() == [1, 2, 3, 4, 5, 6]
    assert frame["Loss"].tolist() == pytest.approx(LOSSES)
    assert frame.attrs["info"]["save_lora_name"] == "chart"


def test_plot_has_loss_on_the_left_and_learning_rates_on_a_twin_axis(tmp_path):
    fig = plot_log(_write_log(tmp_path / "a.csv"), smoothing=0.5)
    ax, ax_lr = fig.axes
    left, right = _lines(ax), _lines(ax_lr)
    assert set(left) == {"Loss", "Loss (smoothed 0.5)"}
    assert set(right) == {"Learning Rate 1", "Learning Rate 2"}
    assert list(left["Loss"].get_xdata()) == [1, 2, 3, 4, 5, 6]
    assert list(left["Loss"].get_ydata()) == pytest.approx(LOSSES)
    # Bias-corrected EMA with weight 0.5 on the past: second value = (0.7 + 0.5*0.9) / 1.5.
    smoothed = np.asarray(left["Loss (smoothed 0.5)"].get_ydata())
    assert smoothed[0] == pytest.approx(0.9) and smoothed[1] == pytest.approx((0.7 + 0.45) / 1.5)
    assert np.ptp(smoothed) < np.ptp(LOSSES)
    assert list(right["Learning Rate 1"].get_ydata()) == pytest.approx([1e-3 / s for s in range(1, 7)], rel=1e-5)
    assert ax.get_ylabel() == "Loss" and ax_lr.get_ylabel() == "Learning Rates"
    assert ax.get_title() == "Training Result: chart"


def test_no_smoothing_draws_the_raw_loss_only(tmp_path):
    fig = plot_log(_write_log(tmp_path / "a.csv"), smoothing=0)
    assert set(_lines(fig.axes[0])) == {"Loss"}
    with pytest.raises(ValueError, match="smoothing: 1"):
        plot_log(tmp_path / "a.csv", smoothing=1)


def test_reference_format_log_is_read(tmp_path):
    path = tmp_path / "ref.csv"
    path.write_text("network_rank,16\nsave_lora_name,old\nStep,Loss,Learning Rate 1\n1,0.2,0.0001\n2,0.1,0.0001\n",
                    encoding="utf-8")
    fig = plot_log(path, smoothing=0)
    assert list(_lines(fig.axes[0])["Loss"].get_ydata()) == [0.2, 0.1]
    assert set(_lines(fig.axes[1])) == {"Learning Rate 1"}


def test_find_and_resolve_logs(tmp_path):
    old = _write_log(tmp_path / "20260101" / "old-1.csv")
    new = _write_log(tmp_path / "20260102" / "new-2.csv")
    os.utime(old, (1_000_000, 1_000_000))
    assert find_logs(tmp_path) == [new, old]
    assert resolve_log("", tmp_path) == new
    assert resolve_log("old-1", tmp_path) == old
    assert resolve_log("20260101/old-1.csv", tmp_path) == old
    with pytest.raises(LogError, match="'nope' not found"):
        resolve_log("nope", tmp_path)
    with pytest.raises(LogError, match="no CSV logs in"):
        resolve_log("", tmp_path / "empty")
    bad = tmp_path / "bad.txt"
    bad.write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(LogError, match="no header row starting with 'Step'"):
        load_log(bad)


def test_plot_command_writes_an_image(tmp_path, capsys):
    from trainer.cli import main

    _write_log(tmp_path / "logs" / "x-1.csv")
    out = tmp_path / "chart.png"
    assert main(["plot", "--logs-dir", str(tmp_path / "logs"), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", "missing", "--logs-dir", str(tmp_path / "logs")]) == 2
    assert "not found" in capsys.readouterr().err
