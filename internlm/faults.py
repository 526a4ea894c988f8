"""Test-only fault injection: ``INTERNLM_TEST_KILL_AT=POINT:STEP[@RANK]`` makes a training process kill itself
with SIGKILL (no handler, no cleanup: what ``kill -9``, the OOM killer or a node failure does) at a controlled point:

    save:S      after this rank has written its files of checkpoint S, before meta.json and the rename
    metrics:S   half-way through appending the metrics line of step S (a cut line is left in metrics.jsonl)
    step:S      in step S, after the forward and backward passes, before the optimizer update

``@RANK`` limits it to that global rank (default: every rank). Unset (always, outside tests), `kill_point` is one
dictionary lookup. tests/train/test_faults.py uses it to check that a rerun reproduces an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Optional, Tuple

KILL_ENV = "INTERNLM_TEST_KILL_AT"


def _target() -> Optional[Tuple[str, int, Optional[int]]]:
    """``(point, step, rank or None)`` from the environment, None when unset."""
    text = os.environ.get(KILL_ENV)
    if not text:
        return None
    spec, _, rank = text.partition("@")
    point, _, step = spec.partition(":")
    return point, int(step), int(rank) if rank else None


def kill_point(point: str, step: int) -> bool:
    """Whether ``INTERNLM_TEST_KILL_AT`` names ``point`` at ``step`` on this process's rank (``RANK``)."""
    target = _target()
    if target is None or target[:2] != (point, int(step)):
        return False
    return target[2] is None or target[2] == int(os.environ.get("RANK", "0"))


def kill_now() -> None:
    """SIGKILL this process (output flushed first, so a test can see how far it got)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["KILL_ENV", "kill_now", "kill_point"]
