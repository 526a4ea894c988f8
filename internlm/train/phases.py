"""Training phases: the plan of a multi-phase run and where a rerun resumes.

`train.py --config P1.py P2.py P3.py` runs the phases in order in one job. Each phase has its own
config (built on a base with `_base_`), its own step budget and learning-rate schedule. A checkpoint
records the phase it belongs to, the step inside it and the fingerprint of every phase run so far, so
a rerun of the same command skips completed phases, resumes the current one, and a phase file added
at the end extends the run from where the last phase ended.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from internlm.config import ConfigError

# Keys that do not change what a phase computes (outputs, logging): editing them is not an "edit".
_NON_TRAINING_KEYS = ("ckpt", "monitor", "work_dir", "JOB_NAME")
# How the global batch is split (with the data-parallel size): any split of the same size computes the same.
_BATCH_SPLIT_KEYS = ("micro_bsz", "micro_num")


@dataclass
class Phase:
    index: int
    name: str
    config_file: str
    cfg: Any  # internlm.config.Config
    steps: int
    global_batch_sequences: int
    fingerprint: str

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_sequences * self.cfg.data.seq_len


def parallel_sizes(cfg: Any, world_size: int) -> Tuple[int, int, int]:
    """(tensor, pipeline, data) sizes of a resolved config for `world_size` processes."""
    par = cfg.parallel
    tp = par.tensor["size"] if isinstance(par.tensor, dict) else int(par.tensor)
    pp = par.pipeline["size"] if isinstance(par.pipeline, dict) else int(par.pipeline)
    return tp, pp, max(1, world_size // (tp * pp))


def fingerprint(cfg: Any, global_batch_sequences: int) -> str:
    """A hash of what a phase computes. The parallel layout is left out (the math is layout independent up
    to float summation order, and a checkpoint may resume under another layout), and so is the split of the
    global batch into data-parallel ranks x micro_bsz x micro_num: only its size counts."""
    content = {k: v for k, v in cfg.items() if k not in _NON_TRAINING_KEYS and not k.isupper()}
    content.pop("parallel", None)
    content["model"] = {k: v for k, v in content["model"].items() if k != "num_chunks"}
    content["data"] = {k: v for k, v in content["data"].items() if k not in _BATCH_SPLIT_KEYS}
    content["global_batch_sequences"] = global_batch_sequences
    blob = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def phase_steps(cfg: Any, global_batch_sequences: int) -> int:
    """Steps of a phase: data.total_steps, or enough steps to consume data.total_tokens."""
    if cfg.data.get("total_steps"):
        return int(cfg.data.total_steps)
    return int(math.ceil(cfg.data.total_tokens / (global_batch_sequences * cfg.data.seq_len)))


def plan_phases(configs: Sequence[Tuple[str, Any]], world_size: int) -> List[Phase]:
    phases = []
    names = set()
    for index, (path, cfg) in enumerate(configs):
        name = cfg.phase.get("name") or os.path.splitext(os.path.basename(path))[0]
        if name in names:
            raise ValueError(f"{path}: phase.name: phase name {name!r} is used twice; give each phase a unique name")
        names.add(name)
        _, _, dp = parallel_sizes(cfg, world_size)
        gbs = dp * cfg.data.micro_bsz * cfg.data.micro_num
        phases.append(Phase(index, name, path, cfg, phase_steps(cfg, gbs), gbs, fingerprint(cfg, gbs)))
    return phases


@dataclass
class ResumePoint:
    phase_index: int  # phase to run next (len(phases) when everything is done)
    phase_step: int  # updates already done inside that phase
    warnings: List[str]
    from_checkpoint: Optional[str] = None
    carried_over: bool = False  # the phase starts fresh from the previous phase's final checkpoint


def resume_point(phases: List[Phase], meta: Optional[Dict[str, Any]], ckpt_path: Optional[str]) -> ResumePoint:
    """Where a run continues, given the newest checkpoint's metadata (None: from scratch)."""
    if meta is None:
        return ResumePoint(0, 0, [])
    history = meta.get("phases", [])
    index, step = meta["phase_index"], meta["phase_step"]
    current_done = bool(meta.get("phase_completed")) or (index < len(phases) and step >= phases[index].steps)
    warnings = []
    for i, record in enumerate(history[: index + 1]):
        if i >= len(phases):
            raise ConfigError(
                f"checkpoint {ckpt_path} is in phase {i + 1} ({record['name']!r}) but the command lists only "
                f"{len(phases)} phase(s): pass all phase configs that were run, in the same order"
            )
        if phases[i].name != record["name"]:
            raise ConfigError(
                f"{phases[i].config_file}: phase {i + 1} is named {phases[i].name!r} but checkpoint {ckpt_path} "
                f"ran {record['name']!r} as phase {i + 1}: keep the phases in the order they were run"
            )
        if i < index or current_done:
            if record["fingerprint"] != phases[i].fingerprint:
                warnings.append(
                    f"phase {record['name']!r} ({phases[i].config_file}) changed after it completed; "
                    f"the change is not re-run"
                )
    if current_done:
        return ResumePoint(index + 1, 0, warnings, ckpt_path, carried_over=True)
    return ResumePoint(index, step, warnings, ckpt_path)
