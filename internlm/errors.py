"""Errors of bad input that stop a run (start-up checks, checkpoints: `internlm.checkpoint`, the work_dir lock).

`train.py` prints one of these as one line ``error: <message>`` (rank 0 only under torchrun, or the rank that
found it when only that rank can) and exits with status 2, like a config error (see docs/troubleshooting.md).
"""

from __future__ import annotations

import os

# A hang (internlm.train.watchdog): a step took longer than monitor.hang_timeout_s; every rank wrote its Python
# stacks to {work_dir}/hang_rank<r>.txt. 124 is what timeout(1) exits with when its command timed out.
EXIT_HUNG = 124

# A file to write the exit status into (rank 0): under torchrun the launcher exits 1 for every non-zero worker
# status, so a requeue wrapper (scripts/slurm_train.sh) reads the trainer's own status (0, 2, 3, 75, 124, 130) here.
EXIT_STATUS_FILE_ENV = "INTERNLM_EXIT_STATUS_FILE"


def record_exit_status(status: int) -> None:
    """Write ``status`` to the file named by ``$INTERNLM_EXIT_STATUS_FILE`` (rank 0 only; nothing when unset)."""
    path = os.environ.get(EXIT_STATUS_FILE_ENV)
    if path and os.environ.get("RANK", "0") == "0":
        with open(path, "w") as f:
            f.write(f"{status}\n")


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


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (a full disk, an I/O error) on some rank: nothing of it is kept (its partial
    folder is removed), the earlier checkpoints are intact. The message is one line naming the step folder, the rank
    and file that failed and what to do; train.py exits with its own status (docs/troubleshooting.md)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


__all__ = [
    "BadInputError",
    "CheckpointError",
    "CheckpointSaveError",
    "WorkDirLocked",
    "EXIT_HUNG",
    "EXIT_STATUS_FILE_ENV",
    "record_exit_status",
]
