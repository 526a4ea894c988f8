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
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from internlm.config import ConfigError, RunConfig
from internlm.parallel import Layout

# Keys that do not change what a phase computes (outputs, logging): editing them is not an "edit".
_NON_TRAINING_KEYS = ("ckpt", "monitor", "profile", "work_dir", "JOB_NAME")
# How the global batch is split (with the data-parallel size): any split of the same size computes the same.
_BATCH_SPLIT_KEYS = ("micro_bsz", "micro_num")


@dataclass(frozen=True)
class Phase:
    """One phase of a run, planned for a world size: its config, layout and step budget."""

    index: int
    config: RunConfig
    layout: Layout
    steps: int  # optimizer updates of this phase
    lr_total_steps: int  # length of the learning-rate schedule (lr_scheduler.total_steps, else ``steps``)
    global_batch_sequences: int
    fingerprint: str

    @property
    def name(self) -> str:
        return self.config.phase.name

    @property
    def config_file(self) -> str:
        return self.config.file

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_sequences * self.config.data.seq_len


def fingerprint(cfg: Any, global_batch_sequences: int) -> str:
    """A hash of what a phase computes, from its resolved `Config`. The parallel layout is left out (the math is
    layout independent up to float summation order, and a checkpoint may resume under another layout), and so
    is the split of the global batch into data-parallel ranks x micro_bsz x micro_num: only its size counts."""
    content = {k: v for k, v in cfg.items() if k not in _NON_TRAINING_KEYS and not k.isupper()}
    content.pop("parallel", None)
    content["model"] = {k: v for k, v in content["model"].items() if k != "num_chunks"}
    content["data"] = {k: v for k, v in content["data"].items() if k not in _BATCH_SPLIT_KEYS}
    content["global_batch_sequences"] = global_batch_sequences
    blob = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def phase_steps(config: RunConfig, global_batch_sequences: int) -> int:
    """Steps of a phase: data.total_steps, or enough steps to consume data.total_tokens."""
    data = config.data
    if data.total_steps is not None:
        return data.total_steps
    return int(math.ceil(data.total_tokens / (global_batch_sequences * data.seq_len)))


def plan_phases(configs: Sequence[RunConfig], world_size: int) -> List[Phase]:
    """The phases of a command, in order, for ``world_size`` processes.

    Raises ConfigError for a repeated phase name or a layout that does not tile ``world_size``.
    """
    phases: List[Phase] = []
    names = set()
    for index, config in enumerate(configs):
        name = config.phase.name
        if name in names:
            raise ConfigError(
                "phase.name", f"phase name {name!r} is used twice; give each phase a unique name", config.file
            )
        names.add(name)
        layout = config.layout(world_size)
        problems = layout.problems()  # the global batch below needs a data size that tiles the world
        if problems:
            raise ConfigError.from_problem(problems[0], config.file)
        gbs = layout.data * config.data.micro_bsz * config.data.micro_num
        steps = phase_steps(config, gbs)
        lr_total = config.lr_scheduler.total_steps or steps
        phases.append(Phase(index, config, layout, steps, lr_total, gbs, fingerprint(config.raw, gbs)))
    return phases


@dataclass
class Progress:
    """How far a run is: global optimizer ``step``s (skipped batches count) and ``tokens`` over all phases, and
    the ``history``, one record per started phase (name, file, steps, fingerprint, first_step, tokens)."""

    step: int = 0
    tokens: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class ResumePoint:
    phase_index: int  # phase to run next (len(phases) when everything is done)
    phase_step: int  # updates already done inside that phase
    warnings: List[str]


def resume_point(phases: List[Phase], meta: Optional[Dict[str, Any]], ckpt_path: Optional[str]) -> ResumePoint:
    """Where a run continues, given the newest checkpoint's metadata (None: from scratch).

    Raises ConfigError when the checkpoint ran phases that the command does not list in the same order.
    """
    if meta is None:
        return ResumePoint(0, 0, [])
    history = meta["phases"]
    index, step = meta["phase_index"], meta["phase_step"]
    current_done = bool(meta["phase_completed"]) or (index < len(phases) and step >= phases[index].steps)
    warnings = []
    for i, record in enumerate(history[: index + 1]):
        if i >= len(phases):
            raise ConfigError(
                "--config",
                f"checkpoint {ckpt_path} is in phase {i + 1} ({record['name']!r}) but the command lists only "
                f"{len(phases)} phase(s): pass all phase configs that were run, in the same order",
            )
        if phases[i].name != record["name"]:
            raise ConfigError(
                "phase.name",
                f"phase {i + 1} is named {phases[i].name!r} but checkpoint {ckpt_path} ran {record['name']!r} as "
                f"phase {i + 1}: keep the phases in the order they were run",
                phases[i].config_file,
            )
        if (i < index or current_done) and record["fingerprint"] != phases[i].fingerprint:
            warnings.append(
                f"phase {record['name']!r} ({phases[i].config_file}) changed after it completed; the change is not "
                f"re-run"
            )
    if current_done:
        return ResumePoint(index + 1, 0, warnings)
    return ResumePoint(index, step, warnings)
