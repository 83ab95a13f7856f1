"""``python -m trainer plot``: write the loss chart of a CSV log as an image."""

from __future__ import annotations

import sys
from pathlib import Path

from trainer.plot import LogError, plot_log, resolve_log


def plot_command(args) -> int:
    """``python -m trainer plot [LOG] [--smoothing S] [--out PNG]``: write the chart as an image."""
    from trainer import paths

    logs_dir = Path(args.logs_dir) if args.logs_dir else paths.logs_dir()
    try:
        path = resolve_log(args.log, logs_dir)
        fig = plot_log(path, args.smoothing)
    except (LogError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out or path.with_suffix(".png").name)
    fig.savefig(out)
    print(f"{path} -> {out}")
    return 0
