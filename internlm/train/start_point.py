"""Where a run of the given phases starts, as one line of text: the "start" line of the training banner and of
`train.py --dry-run`. Training passes the checkpoint it verified before the banner (`ResumePlanner.verify_latest`:
every file's CRC-32, damaged newer ones moved aside), so the line names the checkpoint the run resumes from; the
dry run, which must not read or move everything, skips checkpoints whose files are missing or of the wrong size."""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

from internlm.checkpoint import checkpoint_problems, complete_checkpoints, read_meta
from internlm.config import ConfigError

from .initial_load import start_text
from .phases import Phase, resume_point


def _newest_intact(root: str) -> Tuple[Optional[str], int]:
    """The newest complete checkpoint under ``root`` whose files exist at their recorded sizes (no file is read),
    and how many newer ones were skipped."""
    steps = list(reversed(complete_checkpoints(root)))
    for skipped, step in enumerate(steps):
        path = os.path.join(root, str(step))
        if not checkpoint_problems(path, quick=True):
            return path, skipped
    return None, len(steps)


def resume_point_text(phases: List[Phase], verified: Optional[Tuple[Optional[str], int]] = None) -> Tuple[str, int]:
    """Where a run of ``phases`` starts: ``(text, index of the phase that runs first)``; the index is
    ``len(phases)`` when every phase is complete. ``verified``: ``(the checkpoint the run resumes from or None,
    how many damaged newer ones it skipped)`` as training verified them; None (the dry run): the newest complete
    checkpoint whose files have their recorded sizes."""
    ckpt = phases[0].config.ckpt
    weights = start_text(ckpt)  # ckpt.load_ckpt_info / load_ckpt_folder (initial_load.py)
    if not ckpt.auto_resume:
        return f"from scratch (ckpt.auto_resume is off){weights}", 0
    latest, damaged = verified if verified is not None else _newest_intact(ckpt.save_ckpt_folder)
    # why a checkpoint newer than the one named is not used: the warning after the banner names its bad files
    skipped = f"; {damaged} newer checkpoint(s) damaged and skipped (warning below)" if damaged else ""
    if latest is None:
        return f"from scratch (no checkpoint in {ckpt.save_ckpt_folder}){weights}{skipped}", 0
    try:
        meta = read_meta(latest)
        point = resume_point(phases, meta, latest)
    except (OSError, ValueError, KeyError) as exc:
        return f"checkpoint {latest} is unreadable ({exc}); the newest readable one is used", 0
    except ConfigError as exc:
        return f"checkpoint {latest} does not match these phases: {exc}", 0
    where = f"checkpoint {latest} (step {meta['step']:,})"
    if point.phase_index >= len(phases):
        return f"{where}: all {len(phases)} phase(s) are complete, nothing to do{skipped}", point.phase_index
    phase = phases[point.phase_index]
    first = meta["step"] + 1
    return (
        f"resumes from {where}: phase {phase.index + 1} {phase.name!r} step {point.phase_step + 1:,} "
        f"(global step {first:,}){skipped}",
        point.phase_index,
    )


__all__ = ["resume_point_text"]
