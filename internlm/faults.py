"""Test-only fault injection: ``INTERNLM_TEST_KILL_AT=POINT:STEP[@RANK]`` makes a training process kill itself
with SIGKILL (no handler, no cleanup: what ``kill -9``, the OOM killer or a node failure does) at a controlled point:

    save:S      after this rank has written its files of checkpoint S, before meta.json and the rename
    metrics:S   half-way through appending the metrics line of step S (a cut line is left in metrics.jsonl)
    step:S      in step S, after the forward and backward passes, before the optimizer update

``@RANK`` limits it to that global rank (default: every rank). It fires on the first attempt of a torchrun agent
only (``$TORCHELASTIC_RESTART_COUNT`` unset or 0): a group restarted by ``torchrun --max-restarts`` passes the
same step again and must not die again. Unset (always, outside tests), `kill_point` is one dictionary lookup.
tests/train/test_faults.py and tests/e2e/test_restart.py use it to check that a rerun (or a restart) reproduces an
uninterrupted run.

``INTERNLM_TEST_SLEEP_AT=POINT:STEP[@RANK]=SECONDS`` makes the process sleep instead (`sleep_point`), at the same
points; STEP ``*`` means every step. A long sleep is a hung rank (the hang watchdog's test), a short one at every
step a slow rank (the straggler detector's test).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Optional, Tuple

KILL_ENV = "INTERNLM_TEST_KILL_AT"
SLEEP_ENV = "INTERNLM_TEST_SLEEP_AT"


def _target(text: Optional[str]) -> Optional[Tuple[str, Optional[int], Optional[int]]]:
    """``(point, step or None for "*", rank or None)`` of a ``POINT:STEP[@RANK]`` spec, None when unset."""
    if not text:
        return None
    spec, _, rank = text.partition("@")
    point, _, step = spec.partition(":")
    return point, None if step == "*" else int(step), int(rank) if rank else None


def _names(target: Optional[Tuple[str, Optional[int], Optional[int]]], point: str, step: int) -> bool:
    if target is None or target[0] != point or target[1] not in (None, int(step)):
        return False
    return target[2] is None or target[2] == int(os.environ.get("RANK", "0"))


def kill_point(point: str, step: int) -> bool:
    """Whether ``INTERNLM_TEST_KILL_AT`` names ``point`` at ``step`` on this process's rank (``RANK``), on the
    first torchrun attempt."""
    if os.environ.get(KILL_ENV) is None:
        return False
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") in ("", "0")
    return first_attempt and _names(_target(os.environ[KILL_ENV]), point, step)


def sleep_point(point: str, step: int) -> None:
    """Sleep the seconds ``INTERNLM_TEST_SLEEP_AT`` gives when it names ``point`` at ``step`` on this rank."""
    text = os.environ.get(SLEEP_ENV)
    if text is None:
        return
    spec, _, seconds = text.rpartition("=")
    if _names(_target(spec), point, step):
        time.sleep(float(seconds))


def kill_now() -> None:
    """SIGKILL this process (output flushed first, so a test can see how far it got)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["KILL_ENV", "SLEEP_ENV", "kill_now", "kill_point", "sleep_point"]
