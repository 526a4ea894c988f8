"""Verifying checkpoints on resume: every file against its size and CRC-32 in meta.json, the reading spread
over the ranks like the writing was; a damaged checkpoint is moved aside and the previous complete one is used
(see `latest_verified_checkpoint` and docs/checkpoint.md). The per-file check is `file_io.checkpoint_problems`.
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Tuple

from internlm.errors import CheckpointError
from internlm.parallel.comm import default_group_all_gather, default_group_barrier, default_group_rank

from .file_io import checkpoint_problems
from .files import DAMAGED_SUFFIX, META_FILE, complete_checkpoints, read_meta


def _my_share(path: str, rank: int, world: int) -> List[str]:
    """The problems of the files rank ``rank`` checks: those whose writer rank is ``rank`` modulo ``world``
    (the reading is spread like the writing was); meta.json itself is read by every rank."""
    try:
        files = read_meta(path).get("files") or {}
    except (OSError, ValueError) as exc:
        return [f"{META_FILE} cannot be read ({exc})"]
    mine = [name for name, record in files.items() if int(record.get("writer", 0)) % world == rank]
    return checkpoint_problems(path, mine)


def latest_verified_checkpoint(root: str, warn: Optional[Callable[[str], None]] = None) -> Optional[str]:
    """The newest complete checkpoint under ``root`` whose files all match their checksums, or None when there
    is no complete checkpoint at all.

    Collective when a process group is initialised (every rank checks its share of the files and the problems
    are gathered, so all ranks agree). A damaged checkpoint newer than the one returned is reported through
    ``warn`` with the name of each bad file and what is wrong, and moved aside to ``<step>.damaged`` (kept for
    inspection, never resumed from, pruned or overwritten). Raises `CheckpointError` (a RuntimeError), moving
    nothing, when checkpoints exist but none is usable: a run never silently starts again from step 0.
    """
    rank, world = default_group_rank()
    damaged: List[Tuple[str, List[str]]] = []
    usable = None
    for step in reversed(complete_checkpoints(root)):
        path = os.path.join(root, str(step))
        problems = sorted({p for share in default_group_all_gather(_my_share(path, rank, world)) for p in share})
        if not problems:
            usable = path
            break
        damaged.append((path, problems))
    if usable is None and damaged:
        listed = " | ".join(f"{path}: {'; '.join(problems)}" for path, problems in damaged)
        raise CheckpointError(
            f"no usable checkpoint in {root}: every complete checkpoint is damaged ({listed}); restore the files, "
            f"or move the folders out of {root} to start from scratch"
        )
    for path, problems in damaged:
        if warn is not None:
            warn(
                f"checkpoint {path} is damaged: {'; '.join(problems)}; it is moved aside to {path}{DAMAGED_SUFFIX} "
                f"and the run resumes from {usable}"
            )
        if rank == 0:
            aside, n = path + DAMAGED_SUFFIX, 0
            while os.path.exists(aside):  # an older damaged copy of this step is kept too
                n += 1
                aside = f"{path}{DAMAGED_SUFFIX}.{n}"
            os.replace(path, aside)
    if damaged:
        default_group_barrier()
    return usable


__all__ = ["latest_verified_checkpoint"]
