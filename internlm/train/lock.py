"""The work_dir lock: one run at a time per work_dir.

Rank 0 of a run holds ``<work_dir>/train.lock`` for the run's life: an exclusive ``fcntl.flock`` on the open file,
which the kernel drops when the process ends in any way (even ``kill -9``), and the holder's host, pid, start time
and command written into the file, so a second run is told who holds it. The file is removed on release.

A lock file whose flock is free was left by a run that died (its pid is reported as not running, or, on another
host, as unknown) and is taken over with a note. Where the file system has no flock (some parallel file systems),
the recorded pid decides: alive on this host means held; a holder on another host is taken as held, and the message
says to delete the file once that run is over.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Any, Dict, Optional

from internlm.errors import BadInputError, WorkDirLocked

LOCK_FILE = "train.lock"
_NO_FLOCK = (errno.ENOLCK, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (signal 0 probes without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read_holder(fd: int) -> Optional[Dict[str, Any]]:
    """The holder record of an open lock file (None when empty or unreadable)."""
    try:
        text = os.pread(fd, 65536, 0).decode("utf-8", "replace").strip()
        record = json.loads(text) if text else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def describe_holder(holder: Optional[Dict[str, Any]]) -> str:
    """``pid 123 on host h1, started 2026-01-01 10:00:00 UTC (train.py --config a.py)``."""
    if not holder:
        return "a process that recorded nothing"
    text = f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
    return text + (f" ({holder['command']})" if holder.get("command") else "")


class WorkDirLock:
    """The lock on ``work_dir`` (see the module docstring); `acquire` once, `release` on every exit."""

    def __init__(self, work_dir: str) -> None:
        self.work_dir = work_dir
        self.path = os.path.join(work_dir, LOCK_FILE)
        self._fd: Optional[int] = None
        self._created_dir = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> Optional[str]:
        """Take the lock; returns a note when a stale lock of a dead run was taken over (else None).

        Raises `WorkDirLocked` naming the holder (host, pid, start time) when another run holds it, and
        `BadInputError` when the work_dir cannot be created or written."""
        self._created_dir = not os.path.isdir(self.work_dir)
        try:
            os.makedirs(self.work_dir, exist_ok=True)
            for _ in range(10):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                if self._lock(fd):
                    break
            else:
                raise OSError(errno.EAGAIN, f"{self.path} kept being replaced while locking it")
        except OSError as exc:
            self._remove_created_dir()
            raise BadInputError(
                f"work_dir {self.work_dir!r} is not writable ({exc.strerror or exc}): the run cannot create "
                f"{self.path}; fix its permissions or set work_dir to a writable folder"
            ) from None
        self._fd = fd
        previous = _read_holder(fd)
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        if previous is None:
            return None
        here = previous.get("host") == record["host"]
        state = "no longer running" if here else "on another host"
        return (
            f"took over a stale lock in {self.path}: {describe_holder(previous)} ({state}) ended without releasing it"
        )

    def _lock(self, fd: int) -> bool:
        """flock ``fd``: True when held and the file at ``self.path`` is still the one locked (a releasing holder
        unlinks it; a False return means: open the new file and try again). Raises `WorkDirLocked` if held."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = _read_holder(fd)
                os.close(fd)
                raise WorkDirLocked(self._locked_message(holder)) from None
            if exc.errno not in _NO_FLOCK:
                os.close(fd)
                raise
            self._check_recorded_holder(fd)  # no flock on this file system: the recorded pid decides
        try:
            same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
        return same

    def _check_recorded_holder(self, fd: int) -> None:
        holder = _read_holder(fd)
        if holder is None or holder.get("pid") == os.getpid():
            return
        here = holder.get("host") == socket.gethostname()
        if here and not pid_alive(int(holder.get("pid", -1))):
            return
        os.close(fd)
        raise WorkDirLocked(self._locked_message(holder) + f" (if that run is over, delete {self.path})")

    def _locked_message(self, holder: Optional[Dict[str, Any]]) -> str:
        return (
            f"work_dir {self.work_dir!r} is in use by another run: {describe_holder(holder)}; wait for it to end or "
            f"stop it, or give this run another work_dir (lock file {self.path})"
        )

    def release(self) -> None:
        """Drop the lock and remove the lock file (and the work_dir when `acquire` created it and it is empty)."""
        if self._fd is None:
            return
        try:
            os.remove(self.path)  # while still holding it: a waiting opener then re-opens (see `_lock`)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        self._remove_created_dir()

    def _remove_created_dir(self) -> None:
        if self._created_dir:
            try:
                os.rmdir(self.work_dir)  # only when empty: a failed start leaves no trace
            except OSError:
                pass
            self._created_dir = False

    def __enter__(self) -> "WorkDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


__all__ = ["LOCK_FILE", "WorkDirLock", "describe_holder", "pid_alive"]
