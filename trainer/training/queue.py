"""The job queue: training runs reserved for later, kept in a JSON file so they survive a restart.

Each item holds the complete settings of one run (the reference's settings dict, image paths
included), its name (``save_lora_name``, ``untitled`` when blank), mode, status and result:

- ``pending``  waiting to run;
- ``running``  being trained now;
- ``done``     finished, ``message`` says where the network was saved;
- ``failed``   could not run or crashed, ``message`` holds the error;
- ``stopped``  stopped by the user (what was learned is saved) or cut off by the program ending.

Differences from the reference (SPEC.md §7), on purpose:

- the queue is a file (default ``jsons/queue.json``), not a list in memory;
- the duplicate check compares ``save_lora_name`` among pending and running items (the
  reference compared the scheduler settings, an index slip);
- any item can be deleted by its id, the first one included;
- Stop ends the current job *and* the queue run. The remaining items stay ``pending``; run the
  queue again to continue with them, or ``requeue`` a stopped item to train it again.

The file is re-read before every operation, so ``python -m trainer queue add`` while the UI is
open shows up there on the next refresh. One program at a time runs the queue: it holds
``<queue file>.lock`` (see ``runlock``), and another program's ``run`` is refused naming it.
A ``running`` item whose program ended (the lock is free) reads as ``stopped`` ("interrupted"),
so it can be requeued or removed.
"""

from __future__ import annotations

import json
import os
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from trainer import paths
from trainer.atomic import write_text
from trainer.training.control import TrainControl
from trainer.training.runlock import LockHeld, RunLock, holder

STATUSES = ("pending", "running", "done", "failed", "stopped")
ACTIVE = ("pending", "running")
_FILE_VERSION = 1


class QueueError(ValueError):
    """A queue operation was refused; the message says why and what to do."""


@dataclass
class QueueItem:
    """One reserved run. Times are seconds since the epoch (``None`` until it happens)."""

    id: int
    name: str
    mode: str
    config: dict
    status: str = "pending"
    message: str = ""
    added: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None

    @property
    def model(self) -> str:
        return str(self.config.get("model") or "")


def default_queue_file() -> Path:
    """Where the queue lives unless told otherwise: ``jsons/queue.json``."""
    return paths.jsons_dir() / "queue.json"


class JobQueue:
    """A persisted FIFO of training runs; thread-safe within one program.

    ``recover=True`` (for the program that runs the queue) marks items left ``running`` by a
    program that ended mid-run as ``stopped``, so they are not mistaken for a live run.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, recover: bool = False):
        self.path = Path(path) if path is not None else default_queue_file()
        self._lock = threading.RLock()
        self._run_lock = RunLock(self.lock_path, "running the queue")
        if recover:  # write down what reads already show: items of a program that ended
            with self._lock:
                items = self._read(mark_stale=False)
                if self._mark_stale(items):
                    self._write(items)

    @property
    def lock_path(self) -> Path:
        """The lock file the program running this queue holds."""
        return self.path.with_name(self.path.name + ".lock")

    def runner(self):
        """Who runs this queue now (a ``runlock.Owner``), or None."""
        return holder(self.lock_path)

    # --- file ----------------------------------------------------------------------------

    def _read(self, *, mark_stale: bool = True) -> list[QueueItem]:
        if not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            rows = data["items"] if isinstance(data, dict) else None
            if not isinstance(rows, list):
                raise ValueError("no 'items' list")
            items = [QueueItem(**row) for row in rows]
        except (ValueError, TypeError, KeyError) as error:
            raise QueueError(f"{self.path}: not a readable queue file ({error}); move it away to start "
                             "an empty queue") from None
        if mark_stale:
            self._mark_stale(items)
        return items

    def _mark_stale(self, items: list[QueueItem], *, force: bool = False) -> bool:
        """Items left ``running`` when nobody runs the queue (its program ended) become ``stopped``."""
        running = [item for item in items if item.status == "running"]
        if not running or not force and (self._run_lock.held or self.runner() is not None):
            return False
        for item in running:
            item.status, item.finished = "stopped", time.time()
            item.message = "interrupted: the program running this job ended; requeue it to train it again"
        return True

    def _write(self, items: list[QueueItem]) -> None:
        text = json.dumps({"version": _FILE_VERSION, "items": [asdict(i) for i in items]},
                          indent=2, ensure_ascii=False)
        write_text(self.path, text + "\n")

    def _update(self, item_id: int, **changes: object) -> QueueItem | None:
        with self._lock:
            items = self._read()
            for item in items:
                if item.id == item_id:
                    for key, value in changes.items():
                        setattr(item, key, value)
                    self._write(items)
                    return item
            return None  # deleted meanwhile (e.g. by another program)

    # --- operations ----------------------------------------------------------------------

    def items(self) -> list[QueueItem]:
        """All items in queue order."""
        with self._lock:
            return self._read()

    def get(self, item_id: int | str) -> QueueItem:
        """The item with this id; QueueError naming the known ids if there is none."""
        item_id = _parse_id(item_id)
        with self._lock:
            items = self._read()
        for item in items:
            if item.id == item_id:
                return item
        known = ", ".join(str(i.id) for i in items) or "none, the queue is empty"
        raise QueueError(f"queue item {item_id} does not exist (ids: {known})")

    def add(self, config, *, busy_names: tuple[str, ...] = ()) -> QueueItem:
        """Append a run (a TrainConfig or a settings dict); returns the new item.

        Refused with QueueError when the settings are invalid or incomplete for their mode, or
        when a pending/running item (or a run named in ``busy_names``) already saves under the
        same ``save_lora_name``: both would write the same file.
        """
        from trainer.config import ConfigError, TrainConfig

        try:
            cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
            cfg.check_for_run()
        except ConfigError as error:
            raise QueueError("Could not add to queue: " + "; ".join(error.problems)) from None
        name = cfg.save_lora_name or "untitled"
        with self._lock:
            items = self._read()
            clash = next((i for i in items if i.status in ACTIVE and i.name == name), None)
            if clash is not None:
                raise QueueError(f"Duplicated LoRA name! Could not add to queue: item {clash.id} "
                                 f"({clash.status}) already saves as '{name}'. Change save_lora_name "
                                 "or delete that item.")
            if name in busy_names:
                raise QueueError(f"Duplicated LoRA name! Could not add to queue: the run now training "
                                 f"saves as '{name}'. Change save_lora_name.")
            item = QueueItem(id=max((i.id for i in items), default=0) + 1, name=name, mode=cfg.mode,
                             config=cfg.to_dict())
            self._write(items + [item])
            return item

    def remove(self, item_id: int | str) -> QueueItem:
        """Delete an item at any position; a running item must be stopped first."""
        item_id = _parse_id(item_id)
        with self._lock:
            items = self._read()
            item = next((i for i in items if i.id == item_id), None)
            if item is None:
                self.get(item_id)  # raises the message listing the ids
            if item.status == "running":
                raise QueueError(f"queue item {item_id} ('{item.name}') is training now; press Stop "
                                 "first, then delete it")
            self._write([i for i in items if i.id != item_id])
            return item

    def requeue(self, item_id: int | str) -> QueueItem:
        """Set a finished (done/failed/stopped) item back to pending, at the end of the queue."""
        item = self.get(item_id)
        if item.status in ACTIVE:
            raise QueueError(f"queue item {item.id} is already {item.status}")
        with self._lock:
            items = self._read()
            clash = next((i for i in items if i.status in ACTIVE and i.name == item.name), None)
            if clash is not None:
                raise QueueError(f"Duplicated LoRA name! item {clash.id} ({clash.status}) already saves "
                                 f"as '{item.name}'")
            rest = [i for i in items if i.id != item.id]
            item = next(i for i in items if i.id == item.id)
            item.status, item.message, item.started, item.finished = "pending", "", None, None
            self._write(rest + [item])
            return item

    def clear_finished(self) -> int:
        """Delete every done/failed/stopped item; returns how many were deleted."""
        with self._lock:
            items = self._read()
            kept = [i for i in items if i.status in ACTIVE]
            self._write(kept)
            return len(items) - len(kept)

    # --- running -------------------------------------------------------------------------

    def run_pending(self, *, host, output_dir: Path | None = None, logs_dir: Path | None = None,
                    device=None, control: TrainControl | None = None,
                    on_item: Callable[[QueueItem], None] | None = None) -> list[QueueItem]:
        """Train every pending item in order, including items added meanwhile; returns the finished ones.

        A failing job is marked ``failed`` with its error and the next one runs. ``control.stop()``
        ends the current job (it saves what it learned), marks it ``stopped`` and ends the run; the
        same ``control`` carries every job's progress and messages. ``on_item`` is called with each
        item as it starts and again when it has finished.
        """
        control = control or TrainControl()
        if self._run_lock.held:
            raise QueueError("the queue is already running in this program; wait for it or press Stop")
        try:
            self._run_lock.acquire()
        except LockHeld as held:
            who = held.owner.describe() if held.owner and held.owner.pid else "another program"
            raise QueueError(f"the queue {self.path} is being run by {who}; wait for it to finish or stop it "
                             "there. One program at a time runs a queue.") from None
        try:
            with self._lock:  # we hold the run lock: an item still "running" on file is not live
                items = self._read(mark_stale=False)
                if self._mark_stale(items, force=True):
                    self._write(items)
            return self._run_loop(host, output_dir, logs_dir, device, control, on_item)
        finally:
            self._run_lock.release()

    def _run_loop(self, host, output_dir, logs_dir, device, control: TrainControl, on_item) -> list[QueueItem]:
        from trainer.config import TrainConfig
        from trainer.training.errors import is_input_error
        from trainer.training.job import run_job

        finished: list[QueueItem] = []
        log = control.log
        while not control.stop_requested:
            item = self._claim_next()
            if item is None:
                break
            if on_item:
                on_item(item)
            status, message = "failed", ""
            try:
                config = TrainConfig.from_dict(item.config)
                result = run_job(config, host=host, control=control, output_dir=output_dir, logs_dir=logs_dir,
                                 device=device)
                status, message = ("stopped" if result.stopped else "done"), result.message
            except Exception as error:  # one job's failure must not end the queue
                message = "Error: " + _error_text(error)
                if is_input_error(error):  # bad input: the message says what to fix; no traceback
                    log(f"queue item {item.id} ('{item.name}') could not start: {_error_text(error)}")
                else:
                    log(f"queue item {item.id} ('{item.name}') failed:\n{traceback.format_exc()}")
            done = self._update(item.id, status=status, message=message, finished=time.time()) or item
            finished.append(done)
            if on_item:
                on_item(done)
        return finished

    def _claim_next(self) -> QueueItem | None:
        with self._lock:
            items = self._read()
            item = next((i for i in items if i.status == "pending"), None)
            if item is not None:
                item.status, item.started, item.message = "running", time.time(), ""
                self._write(items)
            return item


def _parse_id(item_id: int | str) -> int:
    try:
        return int(str(item_id).strip())
    except ValueError:
        raise QueueError(f"{item_id!r} is not a queue item id; ids are whole numbers (see 'queue list')") from None


def _error_text(error: Exception) -> str:
    problems = getattr(error, "problems", None)
    return "; ".join(problems) if problems else (str(error) or type(error).__name__)


def format_table(items: list[QueueItem]) -> list[list[str]]:
    """Rows for a table view: id, name, mode, model, status, message, added (local time)."""
    return [[str(i.id), i.name, i.mode, i.model, i.status, i.message,
             time.strftime("%Y-%m-%d %H:%M", time.localtime(i.added))] for i in items]


TABLE_HEADERS = ["id", "name", "mode", "model", "status", "message", "added"]
