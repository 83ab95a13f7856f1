"""Training in the background for the UI: one run at a time (a single job or the queue), with
progress the page polls.

Gradio handlers must not block for a whole run, or the page shows nothing until the end
(the reference's behaviour, SPEC.md §9). So Start and Run queue hand the work to a thread and
return a generator that reports the progress every ``poll_s`` seconds. Each run gets one
``TrainControl``: Stop and Save now go in through it, progress and messages come out of it;
a stopped job saves what it learned, and a queue run ends after that job.
"""

from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from trainer.training.queue import JobQueue, QueueError, QueueItem


RESUME_HINT = "To continue it on this page, tick 'resume the stopped run' and press Start Training."


@dataclass
class Snapshot:
    """What the page shows: the progress line, the result message, and whether a run is going."""

    progress: str
    message: str
    running: bool


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def describe_event(event) -> str:
    """One line for a loop ProgressEvent: pass, step/total, loss, speed, ETA."""
    if event.message:
        # The loop's own messages may already name the pass ("main: steps 0/40").
        prefix = f"{event.pass_name}: "
        return event.message if event.message.startswith(prefix) else prefix + event.message
    parts = [f"{event.pass_name}: step {event.step}/{event.total}"]
    if event.loss_ema == event.loss_ema:  # not NaN
        parts.append(f"loss {event.loss_ema:.4f}")
    if event.lrs:
        parts.append(f"lr {event.lrs[-1]:.2e}")
    if event.epoch is not None:
        parts.append(f"epoch {event.epoch}")
    if event.it_per_s:
        parts.append(f"{event.it_per_s:.2f} it/s")
    if event.step < event.total:
        parts.append(f"ETA {format_seconds(event.eta_s)}")
    return " · ".join(parts)


class Runner:
    """Runs jobs for the UI in a worker thread; thread-safe.

    ``host`` provides the models; a host with its own progress display or Interrupt joins each
    run's control (``Host.follow``).
    """

    def __init__(self, host, queue: JobQueue, *, output_dir: Path | None = None, logs_dir: Path | None = None,
                 device=None, poll_s: float = 0.5, echo: Callable[[str], None] = print):
        self.host, self.queue = host, queue
        self.output_dir, self.logs_dir, self.device = output_dir, logs_dir, device
        self.poll_s, self.echo = poll_s, echo
        self.control = self._new_control()  # the current (or last) run's
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._label = ""
        self._line = ""
        self._step_line = ""  # the last progress event's line, kept when the run ends
        self._message = ""
        self._current_name: str | None = None
        self._previews: list = []  # preview images of the current (or last) run, oldest first

    # --- state ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def current_name(self) -> str | None:
        """save_lora_name of the single job now running (None when idle or running the queue)."""
        return self._current_name if self.running else None

    def snapshot(self) -> Snapshot:
        with self._lock:
            line = f"{self._label} — {self._line}" if self._label and self._line else self._label or self._line
            return Snapshot(line, self._message, self.running)

    def _new_control(self):
        from trainer.training.control import TrainControl

        return TrainControl(on_progress=self._on_progress, on_log=self._on_log, on_preview=self._on_preview)

    def _on_log(self, text: str) -> None:
        self.echo(text)
        with self._lock:
            self._line = text.splitlines()[0] if text else self._line

    def _on_preview(self, step: int, paths) -> None:
        with self._lock:
            self._previews += [(Path(p), step) for p in paths]

    def previews(self) -> list:
        """(image path, step) of every preview of the current or last run, oldest first."""
        with self._lock:
            return list(self._previews)

    def _on_progress(self, event) -> None:
        with self._lock:
            self._line = describe_event(event)
            if not event.message:
                self._step_line = self._line

    # --- starting and stopping -----------------------------------------------------------

    def _begin(self, label: str, target: Callable[[], str], name: str | None = None) -> str | None:
        with self._lock:
            if self.running:
                return "A training run is going already; wait for it or press Stop."
            self.control = self._new_control()
            self._label, self._line, self._current_name = label, "starting...", name
            self._message = (f"Training {label}, started {time.strftime('%H:%M')}. Stop and Save ends it early "
                             "and keeps what was learned.")
            self._step_line = ""
            self._previews = []

            control = self.control

            def work() -> None:
                failed = False
                try:
                    message = target()
                except Exception as error:  # the page gets the message; the console the details of a fault
                    from trainer.training.errors import failure_text, is_input_error

                    # bad input is said in one line that names what to fix; a fault gets its traceback
                    self.echo(f"TrainTrain: {failure_text(error)}" if is_input_error(error) else traceback.format_exc())
                    message, failed = "Error: " + _error_text(error), True
                with self._lock:
                    ending = "failed" if failed else "stopped" if control.stop_requested else "finished"
                    self._message = message
                    self._line = f"{self._step_line} ({ending})" if self._step_line else ending

            self._thread = threading.Thread(target=work, name="traintrain-run", daemon=True)
            self._thread.start()
        return None

    def start_job(self, config, *, resume: bool = False) -> str | None:
        """Train ``config`` in the background (``resume``: continue the stopped run of its name);
        returns a refusal message when busy, else None."""
        from trainer.training.job import run_job

        name = config.save_lora_name or "untitled"

        def target() -> str:
            result = run_job(config, host=self.host, control=self.control, output_dir=self.output_dir,
                             logs_dir=self.logs_dir, resume=resume, device=self.device)
            checked = [c.summary() for c in getattr(result, "load_checks", []) if c.ok]
            return "\n".join([page_message(result), *checked, *(f"note: {n}" for n in result.notes)])

        return self._begin(f"{name} ({config.mode})", target, name)

    def start_demo(self, folder: Path | None = None, steps: int | None = None) -> str | None:
        """The first run without a model (``trainer.training.demo``) in the background; a refusal or None."""
        from trainer.training.demo import STEPS, run_demo

        def target() -> str:
            result = run_demo(folder, steps=steps or STEPS, control=self.control, device=self.device)
            return "\n".join([result.message, *result.lines()])

        return self._begin("demo (LoRA on a tiny built-in model)", target, "demo")

    def start_queue(self) -> str | None:
        """Train every pending queue item in the background; a refusal message or None."""
        pending = [i for i in self.queue.items() if i.status == "pending"]
        if not pending and not self.running:
            return "Nothing to run: the queue has no pending items."

        def on_item(item: QueueItem) -> None:
            if item.status == "running":
                with self._lock:
                    self._label, self._line = f"queue item {item.id}: {item.name} ({item.mode})", "starting..."
                    self._step_line = ""

        def target() -> str:
            done = self.queue.run_pending(host=self.host, output_dir=self.output_dir, logs_dir=self.logs_dir,
                                          device=self.device, control=self.control, on_item=on_item)
            lines = [f"[{i.id}] {i.name}: {_page_words(i.message) or i.status}" for i in done]
            left = sum(1 for i in self.queue.items() if i.status == "pending")
            if left and self.control.stop_requested:
                lines.append(f"Stopped: {left} item(s) still pending; press Run queue to continue.")
            return "\n".join(lines) or "Nothing ran."

        return self._begin("queue", target)

    def stop(self) -> str:
        """Ask the current run (and a queue run) to stop after this step; it saves what it learned."""
        if not self.running:
            return "Nothing is training."
        self.control.stop()
        with self._lock:
            self._line = "stopping after this step (what was learned is saved)..."
        return "Stopping..."

    def save_now(self) -> str:
        """Save the network after the current step; training goes on."""
        if not self.running:
            return "Nothing is training."
        self.control.save_now()
        return "Saving after this step; training goes on."

    def wait(self, timeout: float | None = None) -> Snapshot:
        """Block until the run ends (or ``timeout``); returns the last snapshot."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.snapshot()

    def follow(self) -> Iterator[Snapshot]:
        """Snapshots every ``poll_s`` seconds while the run goes, then the final one."""
        while self.running:
            yield self.snapshot()
            time.sleep(self.poll_s)
        yield self.snapshot()


def page_message(result) -> str:
    """A job's result as the page says it: the CLI's ``--resume`` advice becomes the page's."""
    if not result.stopped:
        return result.message
    saved = f" Saved {result.saved[-1]}." if result.saved else ""
    return f"Stopped at step {result.steps}.{saved} {RESUME_HINT}"


def _page_words(message: str) -> str:
    """A job message with the CLI's resume advice replaced by the page's."""
    return message.replace("continue with --resume", "to continue it, load its settings on the Train tab, "
                           "tick 'resume the stopped run' and press Start Training")


def _error_text(error: Exception) -> str:
    if isinstance(error, QueueError):
        return str(error)
    problems = getattr(error, "problems", None)
    return "\n".join(problems) if problems else (str(error) or type(error).__name__)
