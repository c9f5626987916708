"""One writer per run directory.

``RunLock(run_dir)`` holds an exclusive ``flock`` on ``run_dir/lock`` and writes its holder (host,
PID, start time) there. A second process is refused with that holder named. The kernel (or the NFS
server) releases the lock when its process dies, however it dies; a lock file that still names a
holder when the lock is free is therefore stale — that process ended without releasing it — and is
taken over with a warning. On a pod only the coordinator process (index 0) takes the lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import warnings
from pathlib import Path

LOCK = "lock"


class RunLockedError(RuntimeError):
    """Another live process holds the run directory."""


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise RunLockedError(
                f"{self.path.parent} is in use by another qsharp process ({holder}); wait for it to finish or "
                "stop it, or use another run_dir") from None
        previous = _read(fd)
        if previous:
            warnings.warn(f"{self.path} named {_describe(previous)}, which ended without releasing it (a crash or "
                          "kill); taking it over", stacklevel=2)
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # an empty file: released cleanly
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read(fd: int) -> dict | None:
    raw = os.pread(fd, 4096, 0)
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return {"unreadable": raw[:60].decode(errors="replace")}


def _describe(holder: dict | None) -> str:
    if not holder:
        return "holder unknown"
    if "unreadable" in holder:
        return f"lock file content {holder['unreadable']!r}"
    return f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}"
