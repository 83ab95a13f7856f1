"""``python -m trainer train CONFIG.json``: one run on the standalone host, with a progress bar.

Ctrl-C once stops after the current step (what was learned is saved, with a resumable state);
twice aborts without saving. Exit codes: 0 success, 1 the run failed, 2 bad input found
before training, 130 aborted.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from trainer.training.errors import failure_text, is_input_error


def train_command(args) -> int:
    """``python -m trainer train CONFIG.json [--set k=v ...] [--output-dir DIR] [--resume]``."""
    from trainer.config import ConfigError, TrainConfig
    from trainer.hosts.standalone import StandaloneHost
    from trainer.training.control import TrainControl
    from trainer.training.job import run_job

    try:
        config = TrainConfig.from_json(args.config)
        for item in args.overrides:
            config = config.with_override(item)
        for w in config.warnings:
            print(f"warning: {w}", file=sys.stderr)
        config.check_for_run()
    except (ConfigError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from trainer.compat import import_diffusers_without_bitsandbytes, quiet_library_output

    import_diffusers_without_bitsandbytes()  # this process is ours: skip what training never uses
    loud_again = quiet_library_output()
    output_dir = Path(args.output_dir or "output")
    bar = _ProgressBar()
    control = TrainControl(on_progress=bar.update, on_log=bar.write)

    previous = ctrl_c_stops(control, "press Ctrl-C again to abort without saving")
    try:
        host = StandaloneHost(output_dir=output_dir)
        result = run_job(config, host=host, control=control, output_dir=output_dir,
                         logs_dir=getattr(args, "logs_dir", None), resume=args.resume, device=args.device)
    except KeyboardInterrupt:
        bar.close()
        print("error: aborted; nothing saved", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for the user; the details are not hidden
        bar.close()
        code, text = error_exit(exc)
        print(f"error: {text}", file=sys.stderr)
        if getattr(args, "debug", False):
            raise
        return code
    finally:
        signal.signal(signal.SIGINT, previous)
        loud_again()
    bar.close()
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(result.message)
    return 0


def ctrl_c_stops(control, again: str):
    """Make Ctrl-C ask ``control`` to stop after the current step (what was learned is saved) and
    a second Ctrl-C raise KeyboardInterrupt; returns the previous handler, to put back with
    ``signal.signal(signal.SIGINT, previous)``. ``again`` says what the second press does."""
    def on_sigint(signum, frame):
        if control.stop_requested:
            raise KeyboardInterrupt
        control.stop()
        print(f"\nStopping after this step ({again})...", file=sys.stderr)

    return signal.signal(signal.SIGINT, on_sigint)


def error_exit(exc: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) of a failed run: 2 for bad input found before training
    (settings, files, folders, locks, the stopped run's state), 1 for anything else."""
    return (2 if is_input_error(exc) else 1), failure_text(exc)


class _ProgressBar:
    """tqdm bar fed by loop progress events."""

    def __init__(self):
        self._bar = None
        self._pass = None

    def update(self, event) -> None:
        from tqdm import tqdm

        if self._bar is None or event.pass_name != self._pass:
            self.close()
            self._pass = event.pass_name
            self._bar = tqdm(total=event.total, initial=event.step, desc=event.pass_name, dynamic_ncols=True)
        if event.message:
            return
        self._bar.n = event.step
        # no loss before the first read-back (on a GPU the loop reads losses every few steps)
        post = {"loss": f"{event.loss_ema:.4f}"} if event.loss_ema == event.loss_ema else {}
        if event.lrs:
            post["lr"] = f"{event.lrs[-1]:.2e}"
        if event.epoch is not None:
            post["epoch"] = event.epoch
        self._bar.set_postfix(post, refresh=False)
        self._bar.refresh()

    def write(self, msg: str) -> None:
        from tqdm import tqdm

        tqdm.write(msg)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

