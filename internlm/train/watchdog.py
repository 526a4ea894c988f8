"""The hang watchdog: a step that makes no progress for ``monitor.hang_timeout_s`` seconds is named, not waited on.

The trainer re-arms the watchdog at the start of every step (`HangWatchdog.arm`); the deadline covers the step, its
metrics flush, validation and checkpoint save. When it passes, a background thread writes the Python stack of
every thread of this process (faulthandler) to ``{work_dir}/hang_rank<r>.txt``, prints one line, and exits the
process with `internlm.errors.EXIT_HUNG`. Every rank arms at its own step start, so a rank that waits in a
collective on a hung one reaches its deadline too: all ranks write their stacks, and the hung rank's file names the
frame it is stuck in. The thread waits ``grace_s`` before exiting so that the ranks still waiting see their own
deadline pass (and write their stacks) before the first exit breaks their collective with an error.

A thread needs the GIL to run: if the main thread is stuck in a C call that holds it, the watchdog thread cannot
fire. As a backstop each ``arm`` also sets faulthandler's own C-level timer (`BACKSTOP_S` later), which needs no
GIL: it writes the stacks to stderr and exits with status 1.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import sys
import threading
import time
from typing import Any, Callable, Optional

from internlm.errors import EXIT_HUNG, record_exit_status

BACKSTOP_S = 60.0  # after the deadline and the grace: faulthandler's timer, for a main thread holding the GIL


def hang_timeout(hang_timeout_s: Optional[float], timeout_minutes: float) -> float:
    """The watchdog's limit in seconds: ``monitor.hang_timeout_s``, or with None 0.9 x ``parallel.timeout_minutes``
    (stacks are written before a collective's own timeout turns the hang into an error); 0: off."""
    if hang_timeout_s is None:
        return 0.9 * 60.0 * float(timeout_minutes)
    return float(hang_timeout_s)


class HangWatchdog:
    """Exits the process with `EXIT_HUNG` after writing its stacks when ``arm`` is not called again within
    ``timeout_s`` (0: the watchdog is off, every method a no-op). ``on_hang(message)``: called before the exit (an
    alert; it must bound its own time)."""

    def __init__(
        self,
        timeout_s: float,
        work_dir: str,
        rank: int,
        on_hang: Optional[Callable[[str, int], None]] = None,
        grace_s: Optional[float] = None,
    ) -> None:
        self.timeout_s = float(timeout_s)
        self.path = os.path.join(work_dir, f"hang_rank{rank}.txt")
        self.rank = rank
        self.on_hang = on_hang
        self.grace_s = min(5.0, self.timeout_s / 2) if grace_s is None else grace_s
        self._cond = threading.Condition()
        self._deadline: Optional[float] = None
        self._step = 0
        self._closed = False
        self._thread: Optional[threading.Thread] = None

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def arm(self, step: int) -> None:
        """Step ``step`` starts: it (and what follows it until the next ``arm``) has ``timeout_s`` seconds."""
        if not self.enabled:
            return
        with self._cond:
            self._deadline = time.monotonic() + self.timeout_s
            self._step = step
            backstop = _backstop_stream()
            if backstop is not None:
                faulthandler.dump_traceback_later(self.timeout_s + self.grace_s + BACKSTOP_S, exit=True, file=backstop)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="internlm-hang-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()

    def disarm(self) -> None:
        """No deadline until the next ``arm`` (after the last step, around work the limit does not cover)."""
        with self._cond:
            self._deadline = None
            self._cond.notify()
        if self.enabled:
            faulthandler.cancel_dump_traceback_later()

    def close(self) -> None:
        """Stop the thread (the end of the run)."""
        with self._cond:
            self._closed = True
            self._deadline = None
            self._cond.notify()
        if self.enabled:
            faulthandler.cancel_dump_traceback_later()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        with self._cond:
            while not self._closed:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(timeout=left)
                    continue
                step = self._step
                break
            else:
                return
        self._fire(step)

    def _fire(self, step: int) -> None:
        """Write the stacks, say so in one line, alert, give the other ranks ``grace_s`` to do the same, exit."""
        host = socket.gethostname()
        message = (
            f"rank {self.rank} ({host}): step {step} made no progress for {self.timeout_s:g} s "
            f"(monitor.hang_timeout_s); the Python stacks of its threads are in {self.path}; a rerun resumes from "
            f"the last checkpoint (raise monitor.hang_timeout_s if the step is legitimately this slow)"
        )
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(self.path, "w") as f:
                f.write(message + "\n\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError as exc:  # no stack file: the stacks go to stderr instead
            print(f"warning: cannot write {self.path} ({exc}); stacks follow on stderr", file=sys.stderr)
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        print(f"error: {message}", file=sys.stderr, flush=True)
        if self.on_hang is not None:
            try:
                self.on_hang(message, step)
            except Exception:  # an alert never keeps a hung process alive
                pass
        time.sleep(self.grace_s)
        record_exit_status(EXIT_HUNG)
        sys.stdout.flush()
        os._exit(EXIT_HUNG)  # the main thread is stuck: no clean shutdown is possible


__all__ = ["HangWatchdog", "hang_timeout"]


def _backstop_stream() -> Optional[Any]:
    """The process's real stderr for faulthandler's C timer (it writes to a file descriptor), or None when there is
    none: ``sys.stderr`` may be replaced by an object without one (an in-process run under ``redirect_stderr``, a
    notebook), and ``sys.__stderr__`` may be closed; the watchdog thread still covers the hang then."""
    for stream in (sys.stderr, sys.__stderr__):
        try:
            if stream is not None:
                stream.fileno()
                return stream
        except (AttributeError, OSError, ValueError):
            continue
    return None
