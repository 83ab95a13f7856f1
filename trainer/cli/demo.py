"""``python -m trainer demo``: a first run without a model (see ``trainer.training.demo``)."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from trainer.cli.train import _ProgressBar, ctrl_c_stops


def demo_command(args) -> int:
    """Train a LoRA on a tiny model built in memory; print where the file, previews, plot and load check are."""
    from trainer.training.control import TrainControl
    from trainer.training.demo import STEPS, run_demo

    folder = Path(args.folder) if args.folder else None
    if folder is not None and folder.exists() and any(folder.iterdir()):
        print(f"error: {folder} is not empty; give a new or empty folder (the demo never writes over files)",
              file=sys.stderr)
        return 2
    bar = _ProgressBar()
    control = TrainControl(on_progress=bar.update, on_log=bar.write)

    previous = ctrl_c_stops(control, "press Ctrl-C again to abort")
    started = time.perf_counter()
    try:
        result = run_demo(folder, steps=args.steps or STEPS, control=control, device=args.device)
    except KeyboardInterrupt:
        bar.close()
        print("error: aborted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)
    bar.close()
    print(result.message)
    for line in result.lines():
        print(line)
    print(f"took {time.perf_counter() - started:.0f} s. Next: train on your own model with "
          "`python -m trainer train SETTINGS.json` or the page, `python -m trainer ui`.")
    check = result.load_check
    return 0 if result.file is not None and (check is None or check.ok or check.skipped) else 1
