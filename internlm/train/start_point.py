"""Where a run of the given phases starts, as one line of text: the "start" line of the training banner and of
`train.py --dry-run`. Read from the newest complete checkpoint of the run's checkpoint folder, not verified (a
damaged one is reported and skipped when training starts)."""

from __future__ import annotations

from typing import List, Tuple

from internlm.checkpoint import latest_checkpoint, read_meta
from internlm.config import ConfigError

from .initial_load import start_text
from .phases import Phase, resume_point


def resume_point_text(phases: List[Phase]) -> Tuple[str, int]:
    """Where a run of ``phases`` starts, from the newest complete checkpoint of the run's checkpoint folder (not
    verified: a damaged one is reported and skipped when training starts): ``(text, index of the phase that runs
    first)``; the index is ``len(phases)`` when every phase is complete."""
    ckpt = phases[0].config.ckpt
    weights = start_text(ckpt)  # ckpt.load_ckpt_info / load_ckpt_folder (initial_load.py)
    if not ckpt.auto_resume:
        return f"from scratch (ckpt.auto_resume is off){weights}", 0
    latest = latest_checkpoint(ckpt.save_ckpt_folder)
    if latest is None:
        return f"from scratch (no checkpoint in {ckpt.save_ckpt_folder}){weights}", 0
    try:
        meta = read_meta(latest)
        point = resume_point(phases, meta, latest)
    except (OSError, ValueError, KeyError) as exc:
        return f"checkpoint {latest} is unreadable ({exc}); the newest readable one is used", 0
    except ConfigError as exc:
        return f"checkpoint {latest} does not match these phases: {exc}", 0
    where = f"checkpoint {latest} (step {meta['step']:,})"
    if point.phase_index >= len(phases):
        return f"{where}: all {len(phases)} phase(s) are complete, nothing to do", point.phase_index
    phase = phases[point.phase_index]
    first = meta["step"] + 1
    return (
        f"resumes from {where}: phase {phase.index + 1} {phase.name!r} step {point.phase_step + 1:,} "
        f"(global step {first:,})",
        point.phase_index,
    )


__all__ = ["resume_point_text"]
