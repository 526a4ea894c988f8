"""The training loop: phases in order, steps of forward/backward over micro-batches, optimizer updates,
metrics, validation and checkpoints. The same code runs one process or any 3D-parallel layout.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
import warnings
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist

from internlm.config import dump_config
from internlm.data import build_train_loader, build_valid_batches
from internlm.data.packing import IGNORE_INDEX
from internlm.model import PackedDocs
from internlm.parallel import ParallelContext, all_reduce_, describe_groups, init_parallel_context

from .build import build_loss_fn, build_model_chunks, build_optimizer, build_step_schedule
from .checkpoint import META_FILE, CheckpointManager, checkpoint_layout, latest_verified_checkpoint, read_meta
from .devices import peak_tflops
from .distributed import Launch, timeout_of
from .faults import kill_now, kill_point
from .fp16_metrics import FP16_KEYS, fp16_metrics, read_fp16_metrics
from .health import HealthGuard, Rollback, UnhealthyStop
from .initial_load import load_hf_weights, plan_start
from .lr_schedule import beta2_at, warmup_cosine_lr
from .metrics import (
    MetricsLogger,
    format_count,
    format_duration,
    memory_text,
    read_peak_memory,
)
from .phases import Phase, resume_point
from .profiling import StepProfiler
from .reshard import load_model_resharded, load_optimizer_resharded, trainable_names

_TENSOR_KEYS = ("input_ids", "labels", "cu_seqlens", "position_ids")


def _sum_over(value: torch.Tensor, *groups: Any) -> torch.Tensor:
    """``value`` summed in place over each group in turn (size-1 groups issue nothing); returns it."""
    for group in groups:
        all_reduce_(value, group)
    return value


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


class StopRequested(Exception):
    """Training stopped early on request (ckpt.stop_file_path) after saving a checkpoint."""


class Aborted(Exception):
    """Training aborted at once by a second Ctrl-C, without saving (the message says where a rerun resumes)."""


class Trainer:
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

    def _on_stop_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self._interrupted:
            raise KeyboardInterrupt  # the second Ctrl-C: `run` turns it into `Aborted`, skipping every save
        self._terminated = True
        if signum == signal.SIGINT:
            self._interrupted = True
            then = "saving a checkpoint" if self.phases[0].config.ckpt.enable_save_ckpt else "stopping"
            self.logger.message(f"Ctrl-C: {then} after this step (press again to abort without saving)")

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

    def _final_line(self, summary: Dict[str, Any]) -> str:
        text = f"done: step {summary['step']:,}, {format_count(summary['tokens'])} tokens"
        if summary["loss"] is not None:
            text += f", last loss {summary['loss']:.4f}"
        if summary["val_loss"] is not None:
            text += f", last validation loss {summary['val_loss']:.4f}"
        return text

    def _banner(self) -> None:
        """The start-up banner (rank 0): model, device, dtype, attention, layout, work_dir, where the run starts;
        the rank formula and process groups when there are several processes."""
        if not self.logger.enabled:
            return
        from internlm.model.attention import resolve_backend

        from .plan import resume_plan

        mc = self.model_config
        start, next_index = resume_plan(self.phases)
        layout = self.phases[min(next_index, len(self.phases) - 1)].layout
        try:
            attention = resolve_backend(mc.attn_backend, self.device, mc.dtype)
        except RuntimeError:
            attention = mc.attn_backend
        if self.device.type == "cuda":
            device = torch.cuda.get_device_name(self.device)
        else:
            threads = torch.get_num_threads()
            device = f"CPU ({threads} thread{'s' if threads != 1 else ''} per process)"
        processes = self.pc.world_size
        device += f" x {processes}" if processes > 1 else ""
        tokens = sum(p.steps * p.tokens_per_step for p in self.phases)
        phases = ", ".join(f"{p.name} {p.steps:,}" for p in self.phases)
        lines = [
            f"InternLM pretraining: {format_count(mc.num_params())} parameters (hidden {mc.hidden_size}, "
            f"{mc.num_layers} layers, vocab {mc.vocab_size}), {str(mc.dtype).replace('torch.', '')}, "
            f"attention {attention}",
            f"  device    {device}",
            f"  layout    {layout.describe()}",
            f"  phases    {phases} steps: {self._global_total:,} steps, {format_count(tokens)} tokens",
            f"  work_dir  {self.work_dir}",
            f"  start     {start}",
        ]
        if processes > 1 and layout == self.pc.layout:
            lines += ["  " + line for line in describe_groups(self.pc).splitlines()]
        self.logger.message("\n".join(lines))

    def _finish_saves(self) -> None:
        """Wait for a checkpoint being written in the background (ckpt.async_save) and complete it
        (collective: every rank calls this at the same point)."""
        manager = getattr(self, "_ckpt_in_flight", None)
        self._ckpt_in_flight = None
        if manager is not None and manager.pending:
            started = time.perf_counter()
            path = manager.finish()
            self.logger.message(f"saved checkpoint {path} (waited {time.perf_counter() - started:.1f} s)")

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

    def _phase_end_checkpoint(self, phase: Phase) -> str:
        """The final checkpoint of the phase before ``phase`` (saved by this process), to reshard from."""
        self._finish_saves()
        path = self.last_checkpoint
        meta = read_meta(path) if path else None
        if meta is None or meta["step"] != self.step or not meta["phase_completed"]:
            raise RuntimeError(
                f"phase {phase.name!r} changes the parallel layout, which goes through the previous phase's final "
                f"checkpoint, but none was saved at step {self.step} (ckpt.enable_save_ckpt is off?)"
            )
        return path

    def _load_model(self, path: str) -> bool:
        """Load the model chunks from checkpoint ``path``: the exact per-rank files when it was saved under
        this layout, else resharded from full tensors. Returns True when resharded."""
        # a folder without meta.json (e.g. ckpt.load_ckpt_folder from elsewhere) can only be read as it is
        saved = checkpoint_layout(path) if os.path.isfile(os.path.join(path, META_FILE)) else None
        if saved is None or saved == self.pc.layout:
            self.ckpt.load_model(path, self.chunks)
            return False
        load_model_resharded(path, self.chunks)
        self.logger.message(f"resharded checkpoint from {saved.describe()} to {self.pc.layout.describe()} ({path})")
        return True

    def _load_optimizer(self, path: str) -> None:
        """Optimizer state from checkpoint ``path``: this rank's shard file when saved under this layout, else
        this rank's owned slices copied parameter by parameter out of the saved shards (memory-mapped)."""
        if checkpoint_layout(path) == self.pc.layout:
            self.ckpt.load_optimizer(path, self.optimizer)
        else:
            load_optimizer_resharded(path, self.optimizer, trainable_names(self.chunks))

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

    def _flush_metrics(self, phase: Phase, check_stop: bool = False) -> bool:
        """Write the metrics lines of the steps since the last flush; returns whether to stop.

        Their losses, grad norms and skip flags (device tensors, or Python numbers from an optimizer that
        returns them) and, with ``check_stop``, the all-reduced stop request (`_stop_flags`, a collective: call
        it at the same steps on every rank) are read back with one ``tolist()``: the one host sync of the step
        loop. Step time is the host time since the last flush (or validation / save) over its steps: with
        asynchronous execution that is the device time of those steps.
        """
        if not self._pending and not check_stop:
            return False
        values: List[Any] = []
        for line in self._pending:
            values += [line["loss"], line["grad_norm"], line["skipped"]]
            values += [line[key] for key in FP16_KEYS if key in line]  # device tensors of fp16 loss scaling
        if check_stop:
            values += list(self._stop_flags(phase).unbind())
        host = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in values]).tolist()
        now = time.perf_counter()
        stop = False
        if check_stop:
            stop = self._stop_decision(host[-2], host[-1])
        lines, self._pending = self._pending, []
        if lines:
            elapsed = max(now - self._window_start, 1e-9) / len(lines)
            flops_per_step = self._flops_per_step(phase)
            tflops = flops_per_step / self.pc.world_size / elapsed / 1e12
            rate = flops_per_step / elapsed  # the whole job's FLOP/s, for the ETA (smoothed over flushes)
            self._flop_rate = rate if self._flop_rate is None else 0.7 * self._flop_rate + 0.3 * rate
            # peak memory since the previous reading: allocator counters / getrusage, no device sync
            lines[-1].update(read_peak_memory(self.device))
            log_every = phase.config.monitor.log_every
            offset = 0
            for line in lines:
                fp16 = [key for key in FP16_KEYS if key in line]
                loss, grad_norm, skipped, *fp16_values = host[offset : offset + 3 + len(fp16)]
                offset += 3 + len(fp16)
                self._skipped_steps += int(skipped > 0)
                line.update(loss=loss, grad_norm=grad_norm, skipped=skipped > 0, skipped_steps=self._skipped_steps)
                line.update(read_fp16_metrics(fp16, fp16_values))
                line.update(
                    tgs=phase.tokens_per_step / self.pc.world_size / elapsed,
                    tflops=tflops,
                    mfu=None if self._peak_tflops is None else tflops / self._peak_tflops,
                    step_time=elapsed,
                )
                self.guard.observe(line)  # counts non-finite steps and spikes, says why (health.py)
                self.logger.log(line)
                if line.get("overflow"):
                    self.logger.message(
                        f"step {line['step']} skipped: fp16 gradient overflow, loss scale now {line['loss_scale']:g}"
                    )
                show = line["phase_step"] % log_every == 0 or line["phase_step"] == phase.steps
                self._console_step(phase, line, show)
            self.last_loss = lines[-1]["loss"]
        self._window_start = now
        self.guard.after_flush()  # health decisions, at the flush: `UnhealthyStop` or `Rollback`
        return stop

    def _flops_per_step(self, phase: Phase) -> float:
        """Model FLOPs of one step of ``phase`` over the whole job (forward and backward)."""
        return self.model_config.flops_per_token(phase.config.data.seq_len) * phase.tokens_per_step

    def _console_step(self, phase: Phase, line: Dict[str, Any], show: bool) -> None:
        """A step's line for the console and train.log: ``phase1 step 120/300 (global 120/450)``, the ETA over
        all phases (the remaining FLOPs at the measured FLOP rate), loss, lr, gradient norm, TFLOPS and MFU,
        peak memory, skipped steps and tokens so far."""
        remaining = (phase.steps - line["phase_step"]) * self._flops_per_step(phase) + self._later_flops
        eta = remaining / self._flop_rate if self._flop_rate else math.inf
        self._mem_text = memory_text(line) or self._mem_text
        head = f"{phase.name} step {line['phase_step']}/{phase.steps} (global {line['step']}/{self._global_total})"
        fields = [
            f"ETA {format_duration(eta)}",
            f"loss {line['loss']:.4f}",
            f"lr {line['lr']:.2e}",
            f"grad {line['grad_norm']:.3g}",
            f"{line['tflops']:.3g} TFLOPS, MFU {'n/a' if line['mfu'] is None else format(line['mfu'], '.1%')}",
        ]
        if self._mem_text:
            fields.append(self._mem_text)
        fields += [f"skipped {line['skipped_steps']}", f"{format_count(line['tokens'])} tokens"]
        if line.get("loss_spikes"):
            fields.insert(-1, f"spikes {line['loss_spikes']}")
        if "loss_scale" in line:  # fp16: the dynamic loss scale and the overflow steps skipped so far
            fields.insert(-1, f"scale {line['loss_scale']:g}, overflows {line['overflow_steps']}")
        self.logger.step(head, " | ".join(fields), line["step"], self._global_total, show)

    def _stop_flags(self, phase: Phase) -> torch.Tensor:
        """This rank's stop request as ``[stop now, -(step named by the stop file)]``, all-reduced (max) over the
        world so that every rank reads the same values: a file appearing mid-step cannot split the job.

        Stop after SIGTERM, or as InternLM's ckpt.stop_file_path asks: after the step written in that file
        (after this step, if it is empty). A collective: every rank calls it at the same (logging) steps.
        """
        path = phase.config.ckpt.stop_file_path
        target = math.inf
        if path and os.path.isfile(path):
            with open(path) as f:
                text = f.read().strip()
            if not text:
                target = self.step
            elif text.isdigit():
                target = int(text)
        flags = torch.tensor([1.0 if self._terminated else 0.0, -target], dtype=torch.float64, device=self.device)
        if self.pc.world_size > 1:
            all_reduce_(flags, dist.group.WORLD, op=dist.ReduceOp.MAX)
        return flags

    def _stop_decision(self, now: float, minus_target: float) -> bool:
        """Whether to stop after this step, from the agreed `_stop_flags`; a stop file naming a later step is
        remembered (``_stop_at``) and honoured at that step without another collective."""
        target = -minus_target
        if now > 0 or target <= self.step:
            return True
        if math.isfinite(target):
            self._stop_at = int(target)
        return self._stop_at is not None and self.step >= self._stop_at

    def _stop(self, phase: Phase) -> None:
        """End the run after a stop request (the checkpoint is saved)."""
        self._clear_stop_file(phase)
        self.logger.close_bar()
        reason = "on a stop signal" if self._terminated else f"as asked by {phase.config.ckpt.stop_file_path}"
        raise StopRequested(f"stopped after step {self.step} {reason}; rerun the same command to resume")

    def _clear_stop_file(self, phase: Phase) -> None:
        path = phase.config.ckpt.stop_file_path
        if self.pc.rank == 0 and path and os.path.isfile(path) and not self._terminated:
            os.remove(path)

    def _to_device(self, micro_batch: Dict[str, Any]) -> Dict[str, Any]:
        """The micro-batch's tensors on the device, plus ``docs``: its `PackedDocs` (device boundaries with the
        loader's host-side values), shared by every chunk and layer that processes it."""
        out = dict(micro_batch)
        for key in _TENSOR_KEYS:
            out[key] = micro_batch[key].to(self.device, non_blocking=True)
        out["docs"] = PackedDocs(out["cu_seqlens"], micro_batch.get("cu_seqlens_list"), micro_batch.get("max_seqlen"))
        return out

    def _train_step(self, batch: List[Dict[str, Any]], schedule, lr: float, beta2: float, global_tokens: int):
        """One optimizer update over this rank's micro-batches; returns the global ``(loss, step_result)`` without
        a host sync: the loss is a device tensor, ``step_result`` what ``optimizer.step()`` returns (a
        `StepResult`: ``grad_norm, skipped = step_result``, plus ``overflow`` / ``nonfinite`` / ``loss_scale``).

        ``global_tokens`` is the number of label tokens of the whole global batch (a Python int from the
        loader, the same on every rank): the loss normalisation needs no all-reduce. With fp16 the backward
        pass takes ``loss_sum * loss_scale / global_tokens`` (the scale a device scalar; every pipeline schedule
        forms the backward's loss on the last stage from this factor), the reported loss stays unscaled."""
        scale = 1.0 / max(int(global_tokens), 1)
        batch = [self._to_device(mb) for mb in batch]
        self.optimizer.set_lr(lr)
        self.optimizer.set_beta2(beta2)
        self.optimizer.begin_step(len(batch))
        loss_scale = getattr(self.optimizer, "loss_scale", None)  # fp16: the dynamic loss scale (device scalar)
        backward_scale = scale if loss_scale is None else loss_scale * scale
        loss_sum = schedule.forward_backward(self.chunks, batch, self.loss_fn, backward_scale)
        if kill_point("step", self.step + 1):  # tests only (INTERNLM_TEST_KILL_AT): kill -9 in the middle of a step
            kill_now()
        # the global loss before the update: a non-finite one skips it, as a non-finite gradient norm does
        loss_sum = _sum_over(loss_sum.detach().float().clone(), self.pc.dp_group, self.pc.pp_group)
        step_result = self.optimizer.step(skip=~torch.isfinite(loss_sum))
        return loss_sum * scale, step_result

    @torch.no_grad()
    def _validate(self, valid_batches: List[Dict[str, Any]], schedule) -> float:
        self.optimizer.sync_params()
        local_tokens = sum(mb["label_tokens"] for mb in valid_batches)
        tokens = _sum_over(torch.tensor(float(local_tokens), device=self.device), self.pc.dp_group)
        batch = [self._to_device(mb) for mb in valid_batches]
        if len(self.chunks) > 1 and len(batch) % self.pc.pp_size:
            # the interleaved schedule runs micro-batches in groups of pp_size: pad with loss-free copies
            padding = dict(batch[-1], labels=torch.full_like(batch[-1]["labels"], IGNORE_INDEX))
            batch += [padding] * (self.pc.pp_size - len(batch) % self.pc.pp_size)
        for chunk in self.chunks:
            chunk.eval()
        loss_sum = schedule.forward_backward(self.chunks, batch, self.loss_fn, 1.0, forward_only=True)
        for chunk in self.chunks:
            chunk.train()
        loss_sum = _sum_over(loss_sum.detach().float().clone(), self.pc.dp_group, self.pc.pp_group)
        self.last_val_loss = float(loss_sum / tokens.clamp(min=1))
        self.logger.log(dict(step=self.step, val_loss=self.last_val_loss))
        self.logger.message(f"step {self.step}: validation loss {self.last_val_loss:.4f}")
        return self.last_val_loss

    def _save(self, phase: Phase, phase_step: int, loader, completed: bool) -> None:
        if not phase.config.ckpt.enable_save_ckpt or not self.guard.may_save(self.step):  # none while unhealthy
            return
        self._finish_saves()  # the previous save, if still being written, completes first
        self.optimizer.sync_params()
        loader_state = loader.state_dict()
        meta = dict(
            version=2,
            step=self.step,
            tokens=self.tokens,
            phase_index=phase.index,
            phase_name=phase.name,
            phase_step=phase_step,
            phase_steps=phase.steps,
            phase_completed=completed,
            phase_tokens=self.history[-1]["tokens"],
            phases=self.history,
            config_file=phase.config_file,
            layout=self.pc.layout.to_dict(),
            model_config=self.model_config.to_dict(),
            data=loader_state,
            **self.guard.meta(),  # health and skip_batches
        )
        train_state = dict(loader=loader_state, history=self.history, **self.guard.state_dict())
        async_save = phase.config.ckpt.async_save
        path = self.ckpt.save(self.step, self.chunks, self.optimizer, train_state, meta, async_save=async_save)
        self.last_checkpoint = path
        if async_save:
            self._ckpt_in_flight = self.ckpt  # completed by the next save, the end of training or a stop
            self.logger.message(f"saving checkpoint {path} in the background")
        else:
            self.logger.message(f"saved checkpoint {path}")
