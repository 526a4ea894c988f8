"""Errors of bad input that stop a run (start-up checks, checkpoints: `internlm.checkpoint`, the work_dir lock).

`train.py` prints one of these as one line ``error: <message>`` (rank 0 only under torchrun, or the rank that
found it when only that rank can) and exits with status 2, like a config error (see docs/troubleshooting.md).
"""

from __future__ import annotations


class BadInputError(Exception):
    """A bad input that stops the run before any work is lost; the message is one line naming the file or key
    and what to do. ``local``: found by this rank only (the others cannot know), so this rank prints it."""

    def __init__(self, message: str, local: bool = False) -> None:
        self.local = local
        super().__init__(" ".join(str(message).split()))


class CheckpointError(BadInputError, RuntimeError):
    """A checkpoint that cannot be used: damaged with no complete one left, another model's, no meta.json."""


class WorkDirLocked(BadInputError):
    """Another run holds the work_dir's lock."""


__all__ = ["BadInputError", "CheckpointError", "WorkDirLocked"]
