"""Where a run starts: the resume / start decision the trainer takes before its phase loop, and restoring it.

The newest verified checkpoint (auto-resume), kept back to the newest healthy one (health.py), against
``ckpt.load_ckpt_info`` / ``ckpt.load_ckpt_folder`` (InternLM's precedence, initial_load.py), or the checkpoint
a rollback goes back to; then (`ResumePlanner.restore`, once the trainer built the layout of the phase that runs
next) the model, RNG, data position, step, tokens and health counters of the checkpoint, or initial weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from internlm.checkpoint import read_meta
from internlm.checkpoint.reshard import load_hf_weights
from internlm.checkpoint.verify import latest_verified_checkpoint
from internlm.config import dump_config

from .checkpointer import Checkpointer
from .health import HealthGuard
from .initial_load import StartPlan, plan_start
from .metrics import MetricsLogger
from .model_state import ModelState
from .phases import Phase, Progress, ResumePoint, resume_point


@dataclass(frozen=True)
class StartDecision:
    """Where a run (or a rollback) starts: ``point`` (phase and step), ``plan`` (where the model, optimizer and
    data position come from), ``meta`` (of ``plan.resume_path``); ``unhealthy``: not empty when no healthy
    checkpoint is left to resume from (`UnhealthyStop`'s message; nothing else is set then)."""

    point: ResumePoint
    plan: StartPlan
    meta: Optional[Dict[str, Any]]
    unhealthy: str = ""

    @property
    def random_init(self) -> bool:
        """Whether new model chunks need random weights (no checkpoint or initial weights overwrite them)."""
        return self.plan.resume_path is None and not self.plan.weights_from


@dataclass(frozen=True)
class Restored:
    """What `ResumePlanner.restore` loaded: the run's progress and the data position (None: start afresh)."""

    progress: Progress
    loader_state: Optional[Dict[str, Any]]


class ResumePlanner:
    """Decides where the run starts (`decide`) and loads it (`restore`). ``ckpt``: the run's ``ckpt`` section
    (auto_resume, load_ckpt_info, load_ckpt_folder: see `plan_start`)."""

    def __init__(
        self,
        phases: List[Phase],
        work_dir: str,
        ckpt: Any,
        rank: int,
        checkpointer: Checkpointer,
        health: HealthGuard,
        logger: MetricsLogger,
    ) -> None:
        self.phases = phases
        self.work_dir = work_dir
        self.ckpt = ckpt
        self.rank = rank
        self.checkpointer = checkpointer
        self.health = health
        self.logger = logger
        self._verified: Optional[Tuple[Optional[str], List[str]]] = None  # verify_latest's, until decide uses it

    def _dump_configs(self) -> None:
        if self.rank == 0:
            for phase in self.phases:
                dump_config(phase.config.raw, os.path.join(self.work_dir, f"config_{phase.name}.py"))

    def verify_latest(self) -> Tuple[Optional[str], int]:
        """Verify the checkpoints before the banner (collective: every rank checks its share of the files), so that
        its start line names the checkpoint the run resumes from: ``(that checkpoint or None, how many damaged
        newer ones were moved aside)``. Their warnings are held until `decide`, which uses this result once."""
        self._dump_configs()  # first, as decide did before verifying (a run refused for damage still records them)
        held: List[str] = []
        latest = latest_verified_checkpoint(self.checkpointer.root, held.append) if self.ckpt.auto_resume else None
        self._verified = (latest, held)
        return latest, len(held)

    def decide(self, rollback_to: Optional[str]) -> StartDecision:
        """Write every phase's config to work_dir and decide where the run starts: from ``rollback_to`` when a
        rollback goes back to that checkpoint, else by the precedence of the module docstring."""
        if self._verified is None:
            self._dump_configs()
        warn = lambda text: self.logger.message(f"warning: {text}")  # noqa: E731
        # the newest checkpoint whose files match their checksums (damaged ones are reported and skipped)
        if self._verified is not None:  # verified before the banner: its warnings are due now
            latest, held = self._verified
            self._verified = None
            for text in held:
                warn(text)
        else:
            latest = latest_verified_checkpoint(self.checkpointer.root, warn) if self.ckpt.auto_resume else None
        # one marked unhealthy: the newest healthy one before it
        healthy = self.health.healthy_resume(latest, rolling_back=rollback_to is not None)
        if not healthy.proceed:
            return StartDecision(ResumePoint(0, 0, []), StartPlan(), None, unhealthy=healthy.reason)
        # auto-resume vs ckpt.load_ckpt_info vs ckpt.load_ckpt_folder, by InternLM's precedence (initial_load.py)
        plan = plan_start(self.ckpt, healthy.path)
        if rollback_to is not None:
            plan = StartPlan(resume_path=rollback_to, optimizer_from=rollback_to, sampler_from=rollback_to)
        for text in plan.messages:
            self.logger.message(text)
        meta = read_meta(plan.resume_path) if plan.resume_path else None
        point = resume_point(self.phases, meta, plan.resume_path)
        for warning in point.warnings:
            self.logger.message(f"warning: {warning}")
        return StartDecision(point, plan, meta)

    def restore(self, start: StartDecision, model: ModelState, rollback_to: Optional[str]) -> Restored:
        """Load what ``start`` decided into ``model`` (built for the phase that runs next): the checkpoint's
        model, RNG states, data position, progress and health state, or the initial weights."""
        latest, plan, meta = start.plan.resume_path, start.plan, start.meta
        progress, loader_state = Progress(), None
        if latest:
            resharded = self.checkpointer.load_model(latest, model)
            if resharded:
                self.logger.message("RNG states are per rank and were saved under another layout: not restored")
            train_state = self.checkpointer.load_train_state(latest, model, restore_rng=not resharded)
            loader_state = train_state["loader"] if plan.sampler_from else None
            progress = Progress(meta["step"], meta["tokens"], train_state["history"])
            # skipped steps, health counters and loss window
            self.health.restore(meta, train_state, rolling_back=rollback_to is not None)
            self.logger.truncate_after(progress.step)
            self.logger.message(
                f"resumed from {latest} (step {progress.step}, phase {meta['phase_name']!r} step {meta['phase_step']})"
            )
        else:
            self.logger.truncate_after(0)  # a fresh start (e.g. after deleting checkpoints) starts a fresh log
        if latest is None and plan.weights_from:
            if plan.weights_type == "hf":
                load_hf_weights(plan.weights_from, model.chunks)
            else:
                self.checkpointer.load_model(plan.weights_from, model)
            self.logger.message(f"initial model weights from {plan.weights_from}")
            if plan.sampler_from:  # ckpt.load_ckpt_info content 'sampler' without 'scheduler'
                loader_state = self.checkpointer.load_train_state(plan.sampler_from, model, restore_rng=False)["loader"]
        return Restored(progress, loader_state)
