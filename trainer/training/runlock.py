"""Locks that let one process at a time run a name (or the queue), and that a crash never leaves stuck.

A lock is a small file (``.<name>.lock`` next to the output, ``<queue file>.lock`` for the
queue) holding who took it: pid, host name, start time and what runs. Where ``fcntl`` exists
(Linux, macOS) the file is held with ``flock``: the system drops it when the owner exits or
crashes, so a leftover file is never taken for a live run. Elsewhere the file is created
exclusively and counts as stale when its pid is no longer alive on this host.

flock locks belong to an open file, so two threads of one program that each take the lock
exclude each other as two programs do.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


@dataclass(frozen=True)
class Owner:
    """Who holds a lock, as written in the lock file."""

    pid: int
    host: str
    started: float
    what: str = ""

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started)) if self.started else "?"
        what = f"{self.what}, " if self.what else ""
        return f"{what}process {self.pid} on {self.host}, started {when}"


class LockHeld(RuntimeError):
    """The lock is taken by a live process (``owner``, when its lock file could be read)."""

    def __init__(self, path: Path, owner: Owner | None):
        self.path, self.owner = Path(path), owner
        who = owner.describe() if owner else "another process"
        super().__init__(f"{who} holds {path}")


def _read_owner(path: Path) -> Owner | None:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return Owner(int(data["pid"]), str(data["host"]), float(data.get("started") or 0), str(data.get("what", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def pid_alive(pid: int) -> bool:
    """True when a process ``pid`` exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


class RunLock:
    """An exclusive, crash-safe lock file; use ``acquire()``/``release()`` or ``with``."""

    def __init__(self, path: str | os.PathLike, what: str = ""):
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        """Take the lock or raise LockHeld naming its owner."""
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            self._acquire_exclusive()
        else:
            self._acquire_flock()
        return self

    def _acquire_flock(self) -> None:
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                owner = _read_owner(self.path)
                if owner is None or owner.host == socket.gethostname() and not pid_alive(owner.pid):
                    time.sleep(0.05)  # a reader's short probe (``holder``), or an owner just exiting
                    continue
                raise LockHeld(self.path, owner) from None
            # The previous owner may have removed the file between our open and flock: then we
            # hold a lock on a file nobody else sees; start again with the current file.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                self._write_owner()
                return
            os.close(fd)
        raise LockHeld(self.path, _read_owner(self.path))

    def _acquire_exclusive(self) -> None:
        for _ in range(2):
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                self._write_owner()
                return
            except FileExistsError:
                owner = _read_owner(self.path)
                if owner is not None and (owner.host != socket.gethostname() or pid_alive(owner.pid)):
                    raise LockHeld(self.path, owner) from None
                try:  # stale: its owner ended without removing it
                    self.path.unlink()
                except FileNotFoundError:
                    pass
        raise LockHeld(self.path, _read_owner(self.path))

    def _write_owner(self) -> None:
        text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                           "what": self.what})
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.write(self._fd, text.encode("utf-8"))

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()  # while still holding it, so nobody takes a file about to vanish
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder(path: str | os.PathLike) -> Owner | None:
    """Who holds the lock at ``path`` now (None when nobody does); takes nothing.

    With flock the answer comes from the lock itself (a dead owner's file counts as free); a
    held lock whose file cannot be read gives an Owner with pid 0.
    """
    path = Path(path)
    if not path.exists():
        return None
    if fcntl is None:
        owner = _read_owner(path)
        if owner is not None and owner.host == socket.gethostname() and not pid_alive(owner.pid):
            return None
        return owner
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_owner(path) or Owner(0, "?", 0.0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
