"""The loss chart of a training run, drawn from its CSV log (format in ``trainer/training/runlog.py``).

Reads this project's logs (``Step,Epoch,Loss,Loss EMA,Learning Rate 1..,Time``) and the
reference's (``Step,Loss,Learning Rate 1..``, whose ``Loss`` is already an EMA): the row whose
first cell is ``Step`` is the header, the ``key,value`` rows above it describe the run.
The chart puts the loss on the left axis (red; raw and smoothed) and every learning-rate column
on a twin right axis, as the reference's Plot tab does. Figures are built with
``matplotlib.figure.Figure`` directly (no pyplot), so drawing from a server thread keeps no
global state and needs no display.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

LOSS_COLOR = "tab:red"


class LogError(ValueError):
    """A CSV log could not be read; the message names the file and the problem."""


def find_logs(logs_dir: str | os.PathLike) -> list[Path]:
    """Every ``*.csv`` under ``logs_dir`` (sub-folders included), newest first."""
    root = Path(logs_dir)
    if not root.is_dir():
        return []
    files = [p for p in root.rglob("*.csv") if p.is_file()]
    return sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)


def resolve_log(name: str | None, logs_dir: str | os.PathLike) -> Path:
    """A log by path or file name (``.csv`` optional) under ``logs_dir``; blank means the newest.

    Unlike the reference, a name that is not found is an error rather than a silent switch to
    the newest file, so the chart shown is always the one asked for.
    """
    logs = find_logs(logs_dir)
    text = (name or "").strip()
    if not text:
        if not logs:
            raise LogError(f"no CSV logs in {logs_dir}; tick logging_save_csv before training to write one")
        return logs[0]
    given = Path(text)
    for candidate in (given, Path(logs_dir) / given):
        if candidate.is_file():
            return candidate
    wanted = text if text.lower().endswith(".csv") else text + ".csv"
    for path in logs:
        if path.name == wanted:
            return path
    raise LogError(f"log {text!r} not found in {logs_dir}; pick one of the listed files or leave it "
                   "blank for the newest")


def load_log(csv_path: str | os.PathLike):
    """The step rows of a log as a pandas DataFrame (numeric columns); ``.attrs["info"]`` holds
    the ``key,value`` rows above the header."""
    import pandas as pd

    path = Path(csv_path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except OSError as error:
        raise LogError(f"{path}: cannot be read ({error.strerror or error})") from None
    header = next((i for i, row in enumerate(rows) if row and row[0].strip() == "Step"), None)
    if header is None:
        raise LogError(f"{path}: no header row starting with 'Step'; is this a training log?")
    columns = [c.strip() for c in rows[header]]
    body = [row[:len(columns)] for row in rows[header + 1:] if row]
    frame = pd.DataFrame(body, columns=columns) if body else pd.DataFrame(columns=columns)
    frame = frame.apply(pd.to_numeric, errors="coerce")
    frame.attrs["info"] = {row[0]: row[1] for row in rows[:header] if len(row) >= 2}
    return frame


def lr_columns(frame) -> list[str]:
    """The learning-rate columns, in order."""
    return [c for c in frame.columns if c.startswith("Learning Rate")]


def smooth(values, smoothing: float):
    """Exponential moving average with weight ``smoothing`` on the past (0 = unchanged, <1),
    bias-corrected at the start, as TensorBoard's smoothing slider."""
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing: {smoothing} is not allowed; use a number from 0 to below 1")
    if smoothing == 0:
        return values
    return values.ewm(alpha=1 - smoothing, adjust=True).mean()


def plot_log(csv_path: str | os.PathLike, smoothing: float = 0.0):
    """A matplotlib Figure of one log: loss (raw, plus smoothed when ``smoothing`` > 0) over
    steps on the left axis, the learning rates on a twin right axis."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    frame = load_log(csv_path)
    if frame.empty:
        raise LogError(f"{csv_path}: no steps logged yet")
    steps = frame["Step"]
    loss = frame["Loss"]
    fig = Figure(figsize=(9, 4.8), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(steps, loss, color=LOSS_COLOR, alpha=0.35 if smoothing > 0 else 1.0, linewidth=1, label="Loss")
    if smoothing > 0:
        ax.plot(steps, smooth(loss, smoothing), color=LOSS_COLOR, linewidth=2,
                label=f"Loss (smoothed {smoothing:g})")
    ax.set_xlabel("Step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("Loss", color=LOSS_COLOR)
    ax.tick_params(axis="y", labelcolor=LOSS_COLOR)
    handles, labels = ax.get_legend_handles_labels()
    lrs = lr_columns(frame)
    if lrs:
        ax_lr = ax.twinx()
        for column in lrs:
            ax_lr.plot(steps, frame[column], linewidth=1.2, linestyle="--", label=column)
        ax_lr.set_ylabel("Learning Rates")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        more_h, more_l = ax_lr.get_legend_handles_labels()
        handles, labels = handles + more_h, labels + more_l
    ax.legend(handles, labels, loc="upper right", fontsize="small")
    name = frame.attrs["info"].get("save_lora_name") or Path(csv_path).stem
    ax.set_title(f"Training Result: {name}")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig
