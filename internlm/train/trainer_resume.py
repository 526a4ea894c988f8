"""Where a run starts: the resume / start decision the trainer takes before its phase loop.

The newest verified checkpoint (auto-resume), kept back to the newest healthy one (health.py), against
``ckpt.load_ckpt_info`` / ``ckpt.load_ckpt_folder`` (InternLM's precedence, initial_load.py); then the layout of
the phase that runs next, the model, RNG, data position, step, tokens and health counters of the checkpoint, or
initial weights.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

from internlm.checkpoint import read_meta
from internlm.checkpoint.reshard import load_hf_weights
from internlm.checkpoint.verify import latest_verified_checkpoint
from internlm.config import dump_config

from .initial_load import StartPlan, plan_start
from .phases import ResumePoint, resume_point


class ResumeMixin:
    """The start-up part of `Trainer` (trainer.py): reads ``phases``, ``pc``, ``work_dir``, ``auto_resume``,
    ``ckpt_section``, ``ckpt``, ``guard``, ``logger``, ``chunks``; sets ``history``, ``step``, ``tokens``."""

    def _resume_or_start(self) -> Tuple[ResumePoint, StartPlan, Optional[Dict[str, Any]]]:
        """Write every phase's config to work_dir, decide where the run starts and load it: returns the resume
        point (phase and step), the start plan (where the optimizer state comes from) and the data position to
        restore (None: the loader starts afresh)."""
        if self.pc.rank == 0:
            for phase in self.phases:
                dump_config(phase.config.raw, os.path.join(self.work_dir, f"config_{phase.name}.py"))
        warn = lambda text: self.logger.message(f"warning: {text}")  # noqa: E731
        # the newest checkpoint whose files match their checksums (damaged ones are reported and skipped)
        latest = latest_verified_checkpoint(self.ckpt.root, warn) if self.auto_resume else None
        latest = self.guard.healthy_resume(latest)  # one marked unhealthy: the newest healthy one before it
        # auto-resume vs ckpt.load_ckpt_info vs ckpt.load_ckpt_folder, by InternLM's precedence (initial_load.py)
        start_plan = self.guard.start_plan(plan_start(self.ckpt_section, latest))  # or a rollback's checkpoint
        for text in start_plan.messages:
            self.logger.message(text)
        latest = start_plan.resume_path
        meta = read_meta(latest) if latest else None
        point = resume_point(self.phases, meta, latest)
        for warning in point.warnings:
            self.logger.message(f"warning: {warning}")
        # the layout of the phase that runs next (of the last phase when all are complete)
        init = latest is None and not start_plan.weights_from  # no random init of weights a checkpoint overwrites
        self._enter_layout(self.phases[min(point.phase_index, len(self.phases) - 1)], init=init)
        loader_state = None
        if latest:
            resharded = self._load_model(latest)
            if resharded:
                self.logger.message("RNG states are per rank and were saved under another layout: not restored")
            train_state = self.ckpt.load_train_state(latest, restore_rng=not resharded)
            loader_state = train_state["loader"] if start_plan.sampler_from else None
            self.history = train_state["history"]
            self.step, self.tokens = meta["step"], meta["tokens"]
            self.guard.restore(meta, train_state)  # skipped steps, health counters and loss window
            self.logger.truncate_after(self.step)
            self.logger.message(
                f"resumed from {latest} (step {self.step}, phase {meta['phase_name']!r} step {meta['phase_step']})"
            )
        else:
            self.logger.truncate_after(0)  # a fresh start (e.g. after deleting checkpoints) starts a fresh log
        self.guard.rolled_back()
        if latest is None and start_plan.weights_from:
            if start_plan.weights_type == "hf":
                load_hf_weights(start_plan.weights_from, self.chunks)
            else:
                self._load_model(start_plan.weights_from)
            self.logger.message(f"initial model weights from {start_plan.weights_from}")
            if start_plan.sampler_from:  # ckpt.load_ckpt_info content 'sampler' without 'scheduler'
                loader_state = self.ckpt.load_train_state(start_plan.sampler_from, restore_rng=False)["loader"]
        return point, start_plan, loader_state
