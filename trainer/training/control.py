"""The one control channel of a run: commands in, callbacks out.

Whoever starts a run (the CLI, the page's runner, the queue, the web-UI tab) makes one
``TrainControl`` and passes it to ``run_job``; the job hands the same object to the loop and
to the host (``Host.follow``). Nothing else carries stop requests or progress.

Commands (any thread, any time): ``stop()`` ends the run after the current optimizer step,
saving what was learned and a resumable state; ``save_now()`` saves ``<name>_<k>steps`` after
the current step and goes on.

Callbacks (called on the training thread): ``on_progress(ProgressEvent)`` after every step and
at the start and end of a pass, ``on_log(text)`` for messages meant for the user,
``on_preview(step, paths)`` when preview images were written. More listeners can be added with
``listen`` (a host showing progress in its own job state does that in ``follow``).

Modelled on OneTrainer's TrainCommands/TrainCallbacks pair, joined into one object because every
caller here needs both halves together.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

_LOGGER = logging.getLogger("trainer")


class TrainControl:
    """Commands in (``stop``, ``save_now``) and callbacks out (progress, log, previews) of one run
    or one queue run; see the module docstring. Thread-safe."""

    def __init__(self, *, on_progress: Callable[[Any], None] | None = None,
                 on_log: Callable[[str], None] | None = None,
                 on_preview: Callable[[int, Sequence[Path]], None] | None = None) -> None:
        self._stop = threading.Event()
        self._save = threading.Event()
        self._lock = threading.Lock()
        self._progress: list[Callable[[Any], None]] = []
        self._log: list[Callable[[str], None]] = []
        self._preview: list[Callable[[int, Sequence[Path]], None]] = []
        self._sources: list[Callable[[], bool]] = []
        self.listen(on_progress=on_progress, on_log=on_log, on_preview=on_preview)

    # --- commands in ---------------------------------------------------------------------

    def stop(self) -> None:
        """End the run after the current step; what was learned is saved."""
        self._stop.set()

    def save_now(self) -> None:
        """Save the network after the current step and continue training."""
        self._save.set()

    @property
    def stop_requested(self) -> bool:
        """Whether a stop was asked for, here or by a watched source (a host's Interrupt)."""
        if not self._stop.is_set() and any(source() for source in self._listeners(self._sources)):
            self._stop.set()
        return self._stop.is_set()

    def watch(self, source: Callable[[], bool]) -> Callable[[], None]:
        """Also stop when ``source()`` says so, asked whenever the loop checks for a stop (a host's
        own Interrupt); returns a function that stops watching it."""
        with self._lock:
            self._sources.append(source)

        def remove() -> None:
            with self._lock:
                if source in self._sources:
                    self._sources.remove(source)

        return remove

    def take_save_request(self) -> bool:
        """True once per ``save_now`` call (the request is consumed)."""
        if self._save.is_set():
            self._save.clear()
            return True
        return False

    # --- callbacks out -------------------------------------------------------------------

    def listen(self, *, on_progress: Callable[[Any], None] | None = None,
               on_log: Callable[[str], None] | None = None,
               on_preview: Callable[[int, Sequence[Path]], None] | None = None,
               first: bool = False) -> Callable[[], None]:
        """Add listeners (``first``: before the ones already there, as a host showing the run in
        its own UI does); returns a function that removes them again."""
        added = [(lst, fn) for lst, fn in ((self._progress, on_progress), (self._log, on_log),
                                           (self._preview, on_preview)) if fn is not None]
        with self._lock:
            for lst, fn in added:
                lst.insert(0, fn) if first else lst.append(fn)

        def remove() -> None:
            with self._lock:
                for lst, fn in added:
                    if fn in lst:
                        lst.remove(fn)

        return remove

    def progress(self, event: Any) -> None:
        for fn in self._listeners(self._progress):
            fn(event)

    def log(self, text: str) -> None:
        """A message for the user; without a log listener it goes to the ``trainer`` logger."""
        listeners = self._listeners(self._log)
        if not listeners:
            _LOGGER.info(text)
        for fn in listeners:
            fn(text)

    def preview(self, step: int, paths: Sequence[Path]) -> None:
        for fn in self._listeners(self._preview):
            fn(step, list(paths))

    def _listeners(self, lst: list) -> list:
        with self._lock:
            return list(lst)
