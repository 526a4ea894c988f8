"""The training loop: phases in order, steps of forward/backward over micro-batches, optimizer updates,
metrics, validation and checkpoints. The same code runs one process or any 3D-parallel layout.

`Trainer` is assembled from one mixin per job: trainer_resume.py (where the run starts), trainer_step.py (one
update, validation), trainer_metrics.py (the metrics read-back, metrics.jsonl and console lines),
trainer_stop.py (stop file, SIGTERM / Ctrl-C), trainer_checkpoints.py (save, load), trainer_banner.py (the
start-up banner, the final line). This module keeps the run, the phase loop, the layouts and the step loop.
"""

from __future__ import annotations

import signal
import threading
import time
import warnings
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist

from internlm.checkpoint.manager import CheckpointManager
from internlm.data import build_train_loader, build_valid_batches
from internlm.parallel import ParallelContext, describe_groups, init_parallel_context
from internlm.planning import peak_tflops

from .build import build_loss_fn, build_model_chunks, build_optimizer, build_step_schedule
from .distributed import Launch, timeout_of
from .fp16_metrics import fp16_metrics
from .health import HealthGuard, Rollback, UnhealthyStop
from .lr_schedule import beta2_at, warmup_cosine_lr
from .metrics import MetricsLogger
from .phases import Phase
from .profiling import StepProfiler
from .trainer_banner import BannerMixin
from .trainer_checkpoints import CheckpointMixin
from .trainer_metrics import MetricsMixin
from .trainer_resume import ResumeMixin
from .trainer_step import StepMixin
from .trainer_stop import Aborted, StopMixin, StopRequested

__all__ = ["Aborted", "StopRequested", "Trainer"]


def _release_groups(pc: ParallelContext) -> None:
    """Destroy the process groups of a parallel context that is being replaced (after a world barrier, so no
    rank still has work queued on them)."""
    kinds = (pc.tp_group, pc.pp_group, pc.dp_group, pc.zero1_group, pc.zero1_replica_group)
    groups = {id(g): g for g in kinds if g is not None}
    if not groups:
        return
    dist.barrier()
    for group in groups.values():
        dist.destroy_process_group(group)


class Trainer(ResumeMixin, StepMixin, MetricsMixin, StopMixin, CheckpointMixin, BannerMixin):
    """Runs the phases of one command. ``pc`` is the parallel context of the first phase's layout; a phase
    with another layout gets a new context, model chunks and optimizer (see `_enter_layout`)."""

    def __init__(self, phases: List[Phase], launch: Launch, pc: ParallelContext) -> None:
        self.phases = phases
        self.pc = pc
        self.device = launch.device
        # run-wide settings: the CLI checks that every phase shares work_dir (and the model); the checkpoint
        # folder, resume switches and logging are those of the first phase
        run_wide = phases[0].config
        self.work_dir = run_wide.work_dir
        self.ckpt_root = run_wide.ckpt.save_ckpt_folder
        self.keep_last = run_wide.ckpt.keep_last
        self.auto_resume = run_wide.ckpt.auto_resume
        self.ckpt_section = run_wide.ckpt  # auto_resume, load_ckpt_info, load_ckpt_folder: see `plan_start`
        self.model_config = run_wide.model_config
        self.logger = MetricsLogger(self.work_dir, enabled=pc.rank == 0, tensorboard=run_wide.monitor.tensorboard)
        torch.manual_seed(run_wide.seed)
        if self.device.type == "cuda":
            torch.backends.cudnn.deterministic = run_wide.cudnn_deterministic
            torch.backends.cudnn.benchmark = run_wide.cudnn_benchmark
        self.ckpt = CheckpointManager(self.ckpt_root, pc, keep_last=self.keep_last)
        # training health (health.py): non-finite steps, loss spikes, data.skip_batches, rollbacks
        skip_texts = [p.config.data.skip_batches for p in phases]
        self.guard = HealthGuard(
            run_wide.health, skip_texts, self.ckpt_root, pc.rank == 0, self.logger.message, self._finish_saves
        )
        self.chunks: Optional[List[Any]] = None  # built by _enter_layout for the first phase that runs
        self.loss_fn = None
        self.optimizer = None
        self.last_checkpoint: Optional[str] = None  # newest checkpoint this process saved
        self.step = 0  # global optimizer updates so far, over all phases
        self.tokens = 0  # tokens consumed so far, over all phases
        self.history: List[Dict[str, Any]] = []  # one record per started phase
        self.last_val_loss: Optional[float] = None
        self.last_loss: Optional[float] = None
        self._peak_tflops = peak_tflops(self.device, run_wide.monitor.peak_tflops)  # None: MFU is not reported
        self._first_metrics_line = True
        # steps whose metrics (device tensors) wait for the next logging step's read-back, see _flush_metrics
        self._pending: List[Dict[str, Any]] = []
        self._window_start = time.perf_counter()  # host time of the last flush (or validation / save)
        self._phase_first_step = 1
        self._stop_at: Optional[int] = None  # a later step a stop file named, agreed on by every rank
        self._skipped_steps = 0  # the optimizer's skipped steps up to the last metrics line written
        # console progress: global steps and FLOPs of the phases after the current one, the measured FLOP rate
        self._global_total = sum(p.steps for p in phases)
        self._later_flops = 0.0
        self._flop_rate: Optional[float] = None
        self._mem_text: Optional[str] = None  # the last memory reading, for the console
        self.profiler = StepProfiler(run_wide.profile, self.work_dir, self.device, pc.rank, self.logger.message)
        # SIGTERM (a scheduler's preemption) or a first Ctrl-C: finish the step, save, stop; a second Ctrl-C
        # aborts at once without saving (`Aborted`)
        self._terminated = False
        self._interrupted = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_stop_signal)
            signal.signal(signal.SIGINT, self._on_stop_signal)

    # ------------------------------------------------------------------ run
    def run(self) -> Dict[str, Any]:
        """Train every phase; returns the summary. Raises `StopRequested` after a stop request's checkpoint,
        `UnhealthyStop` when health stops the run (health.py) and `Aborted` after a second Ctrl-C (nothing saved).
        train.log gets the stop reason or the final line."""
        try:
            with self._warnings_to_log():
                self._banner()
                try:
                    summary = self._run_with_rollbacks()
                except (StopRequested, UnhealthyStop) as stop:
                    self.profiler.finish()
                    self._finish_saves()  # the stop's checkpoint counts only once complete
                    self.logger.message(str(stop))
                    raise
                self.profiler.finish()
                self.logger.message(self._final_line(summary))
                return summary
        except KeyboardInterrupt:
            # a second Ctrl-C (or one before the handlers were installed): no save, no waiting for a background
            # save either (an unfinished checkpoint never counts)
            self.logger.close_bar()
            in_flight = getattr(self, "_ckpt_in_flight", None) is not None  # a background save that never completes
            last = self.last_checkpoint if not in_flight else None
            where = f"the last checkpoint, {last}" if last else "the last complete checkpoint"
            reason = f"aborted by Ctrl-C during step {self.step + 1}: nothing saved; a rerun resumes from {where}"
            self.logger.message(reason)
            raise Aborted(reason) from None
        except (StopRequested, UnhealthyStop):
            raise
        except Exception as exc:
            self.logger.log_only(f"error: {type(exc).__name__}: {exc}")
            raise
        finally:
            self.logger.close()

    @contextmanager
    def _warnings_to_log(self) -> Iterator[None]:
        """Python warnings raised while training also go to train.log."""
        shown = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            self.logger.log_only(f"warning: {category.__name__}: {message} ({filename}:{lineno})")
            shown(message, category, filename, lineno, file, line)

        warnings.showwarning = showwarning
        try:
            yield
        finally:
            warnings.showwarning = shown

    def _run_with_rollbacks(self) -> Dict[str, Any]:
        """`_run`, started again from a checkpoint each time health.rollback rolls back to one (`Rollback`)."""
        while True:
            try:
                return self._run()
            except Rollback:
                self._pending = []
                self.logger.close_bar()
                if self.optimizer is not None:  # rebuilt and loaded from the rollback's checkpoint
                    self.optimizer.close()
                    self.optimizer = None

    def _run(self) -> Dict[str, Any]:
        point, start_plan, loader_state = self._resume_or_start()
        if point.phase_index >= len(self.phases):
            self.logger.message(
                f"all {len(self.phases)} phase(s) are complete (step {self.step}); nothing to do. "
                f"Add a phase config to the command to extend pretraining."
            )
            return self._summary()

        restore_from = start_plan.optimizer_from  # where the optimizer state comes from; None: fresh / in memory
        for phase in self.phases[point.phase_index :]:
            resuming_inside = phase.index == point.phase_index and point.phase_step > 0
            start = point.phase_step if resuming_inside else 0
            if self._enter_layout(phase, init=False):  # a new layout loads the previous phase's checkpoint
                # a new layout between phases: continue from the previous phase's final checkpoint
                restore_from = self._phase_end_checkpoint(phase)
                self._load_model(restore_from)
            self._prepare_optimizer(phase, restore_from, resuming_inside)
            loader = build_train_loader(phase.config.data, phase.config.seed, self.pc.dp_rank, self.pc.dp_size)
            if loader_state is not None and (resuming_inside or not phase.config.phase.reset_data):
                loader.load_state_dict(loader_state)
            if not resuming_inside:
                self.history.append(
                    dict(
                        name=phase.name,
                        file=phase.config_file,
                        steps=phase.steps,
                        fingerprint=phase.fingerprint,
                        first_step=self.step + 1,
                        tokens=0,
                    )
                )
            self._run_phase(phase, start, loader)
            loader_state = loader.state_dict()
            restore_from = None  # later phases continue from memory
        self.guard.check_end()  # the last steps skipped on non-finite values: UnhealthyStop (or a rollback)
        self._finish_saves()
        return self._summary()

    # ------------------------------------------------------------------ layouts
    def _enter_layout(self, phase: Phase, init: bool = True) -> bool:
        """Make the parallel context, model chunks, loss and checkpoint file names those of ``phase.layout``.

        Returns True when the chunks were (re)built: they then hold fresh initial weights, and any optimizer
        of an earlier layout has been closed (``self.optimizer`` is None). Every rank calls this at the
        same point: a new context creates its process groups collectively, in the same order everywhere.
        ``init=False``: a checkpoint is about to overwrite the weights, so new chunks skip the random init.
        """
        wanted = phase.layout
        if self.chunks is not None and wanted == self.pc.layout:
            return False
        if self.optimizer is not None:
            self.optimizer.close()
            self.optimizer = None
        if self.chunks is not None:
            self.logger.message(f"parallel layout changes from {self.pc.layout.describe()} to {wanted.describe()}")
        if wanted != self.pc.layout:
            _release_groups(self.pc)
            timeout = timeout_of(phase.config.parallel.timeout_minutes)
            self.pc = init_parallel_context(wanted, self.pc.rank, timeout=timeout)
            self.ckpt = CheckpointManager(self.ckpt_root, self.pc, keep_last=self.keep_last)
            if self.pc.world_size > 1:
                self.logger.message(describe_groups(self.pc))
        self.chunks = None  # free the old chunks (and the closed optimizer's buffers they view) first
        self.chunks = build_model_chunks(phase.config, self.pc, self.device, init=init)
        self.loss_fn = build_loss_fn(phase.config, self.pc)
        return True

    def _summary(self) -> Dict[str, Any]:
        return dict(step=self.step, tokens=self.tokens, loss=self.last_loss, val_loss=self.last_val_loss)

    def _prepare_optimizer(self, phase: Phase, checkpoint: Optional[str], resuming_inside: bool) -> None:
        """Optimizer state carries over between phases unless the phase sets phase.reset_optimizer: in memory
        (``checkpoint`` None), or from ``checkpoint`` when resuming or after a layout change."""
        reset = phase.config.phase.reset_optimizer and not resuming_inside
        if self.optimizer is not None and not reset:
            return
        if self.optimizer is not None:
            self.optimizer.close()
        self.optimizer = build_optimizer(self.chunks, phase.config, self.pc)
        if checkpoint is not None and not reset:
            self._load_optimizer(checkpoint)
        if reset:
            self.logger.message(f"phase {phase.name!r}: fresh optimizer state (phase.reset_optimizer)")

    # ------------------------------------------------------------------ one phase
    def _run_phase(self, phase: Phase, start: int, loader) -> None:
        """The steps of one phase. A step issues no host sync of its own: its loss, grad norm and skip flag stay
        device tensors until the next logging step (every ``monitor.log_every`` steps and the phase's last),
        where one read-back turns them into every pending step's metrics line and agrees on a stop request."""
        config = phase.config
        schedule = build_step_schedule(config, self.pc)
        valid_batches = build_valid_batches(config.data, config.seed, self.pc.dp_rank, self.pc.dp_size)
        record = self.history[-1]
        lr, beta2 = config.lr_scheduler, config.beta2_scheduler
        before = self.step - start  # global steps before this phase's first
        self.logger.message(
            f"phase {phase.index + 1}/{len(self.phases)} {phase.name!r}: steps {start + 1}..{phase.steps} (global "
            f"{self.step + 1}..{before + phase.steps}), seq_len {config.data.seq_len}, {phase.tokens_per_step:,} "
            f"tokens/step, data {config.data.train_folder}"
        )
        later = self.phases[phase.index + 1 :]
        self._global_total = before + phase.steps + sum(p.steps for p in later)
        self._later_flops = sum(self._flops_per_step(p) * p.steps for p in later)
        self._window_start = time.perf_counter()
        self._phase_first_step = start + 1
        # skipped steps so far (read once here: the optimizer may keep the count on the device), then counted
        # from the steps' skip flags as they are read back
        self._skipped_steps = int(self.optimizer.skipped_steps)
        for phase_step in range(start, phase.steps):
            batch = loader.next_global_batch()
            if self.guard.skips(self.step + 1):  # data.skip_batches: the batch is drawn and dropped, not trained on
                self._skip_batch(phase, record)
            else:
                step_lr = warmup_cosine_lr(
                    phase_step, phase.lr_total_steps, config.adam.lr, lr.warmup_ratio, lr.eta_min, lr.init_steps
                )
                step_beta2 = beta2_at(self.step + 1, beta2.init_beta2, beta2.c)
                self.profiler.before_step(self.step + 1)
                with self.profiler.step_range(self.step + 1):
                    loss, step_result = self._train_step(
                        batch, schedule, step_lr, step_beta2, loader.last_batch_label_tokens
                    )
                grad_norm, skipped = step_result  # a StepResult: also .overflow / .nonfinite / .loss_scale (fp16)
                self.step += 1
                self.profiler.after_step(self.step)
                self.tokens += phase.tokens_per_step
                record["tokens"] += phase.tokens_per_step
                line = dict(
                    step=self.step,
                    phase=phase.name,
                    phase_index=phase.index + 1,
                    phase_step=phase_step + 1,
                    loss=loss,  # device tensors until `_flush_metrics`
                    lr=step_lr,
                    beta2=step_beta2,
                    grad_norm=grad_norm,
                    skipped=skipped,
                    skipped_steps=None,
                    tokens=self.tokens,
                    phase_tokens=record["tokens"],
                    seq_len=config.data.seq_len,
                    tgs=None,  # this and the next three: from the host time between flushes
                    tflops=None,
                    mfu=None,
                    step_time=None,
                    source_tokens=loader.last_batch_source_tokens,
                    **fp16_metrics(step_result, self.optimizer),
                )
                if self._first_metrics_line:
                    line["optim_state_bytes"] = self.optimizer.optim_state_bytes()
                    self._first_metrics_line = False
                self._pending.append(line)
            last = phase_step + 1 == phase.steps
            stop = False
            if (phase_step + 1) % config.monitor.log_every == 0 or last:
                # the logging step: metrics and the stop agreement in one host sync
                stop = self._flush_metrics(phase, check_stop=True)
            elif self._stop_at is not None and self.step >= self._stop_at:
                stop = True  # the step a stop file named, agreed on at an earlier logging step
            if stop and not last:
                self._flush_metrics(phase)
                self._save(phase, phase_step + 1, loader, completed=False)
                self._stop(phase)
            if valid_batches and config.data.valid_every and self.step % config.data.valid_every == 0 and not last:
                self._flush_metrics(phase)
                self._validate(valid_batches, schedule)
                self._window_start = time.perf_counter()
            if last:
                if valid_batches:
                    self._validate(valid_batches, schedule)
                self._save(phase, phase_step + 1, loader, completed=True)
                if stop and phase.index + 1 < len(self.phases):
                    self._stop(phase)  # at a phase end: the next phase starts from this checkpoint on rerun
            elif config.ckpt.enable_save_ckpt and self.step % config.ckpt.checkpoint_every == 0:
                self._flush_metrics(phase)  # metrics.jsonl holds every step up to the checkpoint
                self._save(phase, phase_step + 1, loader, completed=False)
                self._window_start = time.perf_counter()
        self.logger.close_bar()

    def _skip_batch(self, phase: Phase, record: Dict[str, Any]) -> None:
        """A step of data.skip_batches (or one a rollback skips): its batch was drawn and is dropped; no forward,
        no update, no metrics line. The step counts, as InternLM's batch count does: the later step numbers, data
        and learning rates (functions of the step) are those of a run that trained on it."""
        self.step += 1
        self.tokens += phase.tokens_per_step
        record["tokens"] += phase.tokens_per_step
        self.logger.message(f"step {self.step}: batch skipped, not trained on (data.skip_batches '{self.guard.skip}')")
