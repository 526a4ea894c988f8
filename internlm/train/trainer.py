"""The training loop: phases in order, steps of forward/backward over micro-batches, optimizer updates,
metrics, validation and checkpoints. The same code runs one process or any 3D-parallel layout.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from internlm.config import dump_config
from internlm.data import build_train_loader, build_valid_batches
from internlm.data.packing import IGNORE_INDEX
from internlm.parallel import ParallelContext, all_reduce_, describe_groups, init_parallel_context

from .build import build_loss_fn, build_model_chunks, build_optimizer, build_step_schedule
from .checkpoint import META_FILE, CheckpointManager, checkpoint_layout, latest_checkpoint, read_meta
from .distributed import Launch
from .lr_schedule import beta2_at, warmup_cosine_lr
from .metrics import MetricsLogger, device_peak_tflops
from .phases import Phase, resume_point
from .reshard import load_model_resharded, merge_optimizer_checkpoint, trainable_names

_TENSOR_KEYS = ("input_ids", "labels", "cu_seqlens", "position_ids")


def _sum_over(value: torch.Tensor, *groups: Any) -> torch.Tensor:
    """``value`` summed in place over each group in turn (size-1 groups issue nothing); returns it."""
    for group in groups:
        all_reduce_(value, group)
    return value


def _release_groups(pc: ParallelContext) -> None:
    """Destroy the process groups of a parallel context that is being replaced (after a world barrier, so no
    rank still has work queued on them)."""
    groups = {id(g): g for g in (pc.tp_group, pc.pp_group, pc.dp_group, pc.zero1_group) if g is not None}
    if not groups:
        return
    dist.barrier()
    for group in groups.values():
        dist.destroy_process_group(group)


class StopRequested(Exception):
    """Training stopped early on request (ckpt.stop_file_path) after saving a checkpoint."""


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
        self.initial_weights = run_wide.ckpt.load_ckpt_folder
        self.model_config = run_wide.model_config
        self.logger = MetricsLogger(self.work_dir, enabled=pc.rank == 0, tensorboard=run_wide.monitor.tensorboard)
        torch.manual_seed(run_wide.seed)
        if self.device.type == "cuda":
            torch.backends.cudnn.deterministic = run_wide.cudnn_deterministic
            torch.backends.cudnn.benchmark = run_wide.cudnn_benchmark
        self.ckpt = CheckpointManager(self.ckpt_root, pc, keep_last=self.keep_last)
        self.chunks: Optional[List[Any]] = None  # built by _enter_layout for the first phase that runs
        self.loss_fn = None
        self.optimizer = None
        self.last_checkpoint: Optional[str] = None  # newest checkpoint this process saved
        self.step = 0  # global optimizer updates so far, over all phases
        self.tokens = 0  # tokens consumed so far, over all phases
        self.history: List[Dict[str, Any]] = []  # one record per started phase
        self.last_val_loss: Optional[float] = None
        self.last_loss: Optional[float] = None
        self._peak_tflops = device_peak_tflops(self.device, run_wide.monitor.peak_tflops)
        self._first_metrics_line = True
        # SIGTERM (a scheduler's preemption) or a first Ctrl-C: finish the step, save, stop; a second Ctrl-C
        # interrupts at once
        self._terminated = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_stop_signal)
            signal.signal(signal.SIGINT, self._on_stop_signal)

    def _on_stop_signal(self, signum, frame) -> None:
        self._terminated = True
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self.logger.message("Ctrl-C: saving a checkpoint after this step (press again to abort without saving)")

    # ------------------------------------------------------------------ run
    def run(self) -> Dict[str, Any]:
        if self.pc.rank == 0:
            for phase in self.phases:
                dump_config(phase.config.raw, os.path.join(self.work_dir, f"config_{phase.name}.py"))
        latest = latest_checkpoint(self.ckpt.root) if self.auto_resume else None
        meta = read_meta(latest) if latest else None
        point = resume_point(self.phases, meta, latest)
        for warning in point.warnings:
            self.logger.message(f"warning: {warning}")
        # the layout of the phase that runs next (of the last phase when all are complete)
        self._enter_layout(self.phases[min(point.phase_index, len(self.phases) - 1)])
        loader_state = None
        if latest:
            resharded = self._load_model(latest)
            if resharded:
                self.logger.message("RNG states are per rank and were saved under another layout: not restored")
            train_state = self.ckpt.load_train_state(latest, restore_rng=not resharded)
            loader_state = train_state["loader"]
            self.history = train_state["history"]
            self.step, self.tokens = meta["step"], meta["tokens"]
            self.logger.truncate_after(self.step)
            self.logger.message(
                f"resumed from {latest} (step {self.step}, phase {meta['phase_name']!r} step {meta['phase_step']})"
            )
        else:
            self.logger.truncate_after(0)  # a fresh start (e.g. after deleting checkpoints) starts a fresh log
        if latest is None and self.initial_weights:
            self._load_model(self.initial_weights)
            self.logger.message(f"initial model weights from {self.initial_weights}")
        if point.phase_index >= len(self.phases):
            self.logger.message(
                f"all {len(self.phases)} phase(s) are complete (step {self.step}); nothing to do. "
                f"Add a phase config to the command to extend pretraining."
            )
            return self._summary()

        restore_from = latest  # checkpoint the optimizer state comes from; None: it carries over in memory
        for phase in self.phases[point.phase_index :]:
            resuming_inside = phase.index == point.phase_index and point.phase_step > 0
            start = point.phase_step if resuming_inside else 0
            if self._enter_layout(phase):
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
        self.logger.close()
        return self._summary()

    # ------------------------------------------------------------------ layouts
    def _enter_layout(self, phase: Phase) -> bool:
        """Make the parallel context, model chunks, loss and checkpoint file names those of ``phase.layout``.

        Returns True when the chunks were (re)built: they then hold fresh initial weights, and any optimizer
        of an earlier layout has been closed (``self.optimizer`` is None). Every rank calls this at the
        same point: a new context creates its process groups collectively, in the same order everywhere.
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
            self.pc = init_parallel_context(wanted, self.pc.rank)
            self.ckpt = CheckpointManager(self.ckpt_root, self.pc, keep_last=self.keep_last)
            if self.pc.rank == 0:
                print(describe_groups(self.pc), flush=True)
        self.chunks = None  # free the old chunks (and the closed optimizer's buffers they view) first
        self.chunks = build_model_chunks(phase.config, self.pc, self.device)
        self.loss_fn = build_loss_fn(phase.config, self.pc)
        return True

    def _phase_end_checkpoint(self, phase: Phase) -> str:
        """The final checkpoint of the phase before ``phase`` (saved by this process), to reshard from."""
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
        """Optimizer state from checkpoint ``path``: this rank's shard when saved under this layout, else this
        rank's slices of the merged full state."""
        if checkpoint_layout(path) == self.pc.layout:
            self.ckpt.load_optimizer(path, self.optimizer)
        else:
            self.optimizer.load_full_state(merge_optimizer_checkpoint(path, trainable_names(self.chunks)))

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
        config = phase.config
        schedule = build_step_schedule(config, self.pc)
        valid_batches = build_valid_batches(config.data, config.seed, self.pc.dp_rank, self.pc.dp_size)
        record = self.history[-1]
        lr, beta2 = config.lr_scheduler, config.beta2_scheduler
        self.logger.message(
            f"phase {phase.index + 1}/{len(self.phases)} {phase.name!r}: steps {start + 1}..{phase.steps}, "
            f"seq_len {config.data.seq_len}, {phase.tokens_per_step:,} tokens/step, data {config.data.train_folder}"
        )
        flops_per_step = self.model_config.flops_per_token(config.data.seq_len) * phase.tokens_per_step
        for phase_step in range(start, phase.steps):
            batch = loader.next_global_batch()
            step_lr = warmup_cosine_lr(
                phase_step, phase.lr_total_steps, config.adam.lr, lr.warmup_ratio, lr.eta_min, lr.init_steps
            )
            step_beta2 = beta2_at(self.step + 1, beta2.init_beta2, beta2.c)
            started = time.perf_counter()
            loss, grad_norm, skipped = self._train_step(batch, schedule, step_lr, step_beta2)
            elapsed = time.perf_counter() - started
            self.step += 1
            self.tokens += phase.tokens_per_step
            record["tokens"] += phase.tokens_per_step
            self.last_loss = loss
            tflops = flops_per_step / self.pc.world_size / elapsed / 1e12
            line = dict(
                step=self.step,
                phase=phase.name,
                phase_index=phase.index + 1,
                phase_step=phase_step + 1,
                loss=loss,
                lr=step_lr,
                beta2=step_beta2,
                grad_norm=grad_norm,
                skipped=skipped,
                skipped_steps=self.optimizer.skipped_steps,
                tokens=self.tokens,
                phase_tokens=record["tokens"],
                seq_len=config.data.seq_len,
                tgs=phase.tokens_per_step / self.pc.world_size / elapsed,
                tflops=tflops,
                mfu=tflops / self._peak_tflops,
                step_time=elapsed,
                source_tokens=loader.last_batch_source_tokens,
            )
            if self._first_metrics_line:
                line["optim_state_bytes"] = self.optimizer.optim_state_bytes()
                self._first_metrics_line = False
            self.logger.log(line)
            if (phase_step + 1) % config.monitor.log_every == 0 or phase_step + 1 == phase.steps:
                self.logger.progress(
                    phase.name, phase_step + 1, start + 1, phase.steps, loss, phase.tokens_per_step / elapsed
                )
            last = phase_step + 1 == phase.steps
            if not last and self._stop_requested(phase):
                self._save(phase, phase_step + 1, loader, completed=False)
                self._clear_stop_file(phase)
                self.logger.close_bar()
                reason = "on a stop signal" if self._terminated else f"as asked by {config.ckpt.stop_file_path}"
                raise StopRequested(f"stopped after step {self.step} {reason}; rerun the same command to resume")
            if valid_batches and config.data.valid_every and self.step % config.data.valid_every == 0 and not last:
                self._validate(valid_batches, schedule)
            if last:
                if valid_batches:
                    self._validate(valid_batches, schedule)
                self._save(phase, phase_step + 1, loader, completed=True)
            elif config.ckpt.enable_save_ckpt and self.step % config.ckpt.checkpoint_every == 0:
                self._save(phase, phase_step + 1, loader, completed=False)
        self.logger.close_bar()

    def _stop_requested(self, phase: Phase) -> bool:
        """Stop after SIGTERM, or as InternLM's ckpt.stop_file_path asks: after the step written in that file
        (after this step, if it is empty).

        All ranks agree through an all-reduce, so a file appearing mid-step cannot split the job.
        """
        path = phase.config.ckpt.stop_file_path
        wanted = 1.0 if self._terminated else 0.0
        if path and os.path.isfile(path):
            with open(path) as f:
                text = f.read().strip()
            wanted = max(wanted, 1.0 if not text or (text.isdigit() and int(text) <= self.step) else 0.0)
        flag = torch.tensor(wanted, device=self.device)
        if self.pc.world_size > 1:
            all_reduce_(flag, dist.group.WORLD, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def _clear_stop_file(self, phase: Phase) -> None:
        path = phase.config.ckpt.stop_file_path
        if self.pc.rank == 0 and path and os.path.isfile(path) and not self._terminated:
            os.remove(path)

    def _to_device(self, micro_batch: Dict[str, Any]) -> Dict[str, Any]:
        out = dict(micro_batch)
        for key in _TENSOR_KEYS:
            out[key] = micro_batch[key].to(self.device, non_blocking=True)
        return out

    def _train_step(self, batch: List[Dict[str, Any]], schedule, lr: float, beta2: float):
        """One optimizer update over this rank's micro-batches; returns the global (loss, grad_norm, skipped)."""
        local_tokens = sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in batch)
        global_tokens = _sum_over(torch.tensor(float(local_tokens), device=self.device), self.pc.dp_group)
        batch = [self._to_device(mb) for mb in batch]
        self.optimizer.set_lr(lr)
        self.optimizer.set_beta2(beta2)
        self.optimizer.begin_step(len(batch))
        loss_sum = schedule.forward_backward(self.chunks, batch, self.loss_fn, 1.0 / float(global_tokens))
        grad_norm, skipped = self.optimizer.step()
        loss_sum = _sum_over(loss_sum.detach().float().clone(), self.pc.dp_group, self.pc.pp_group)
        return float(loss_sum / global_tokens), float(grad_norm), bool(skipped)

    @torch.no_grad()
    def _validate(self, valid_batches: List[Dict[str, Any]], schedule) -> float:
        self.optimizer.sync_params()
        local_tokens = sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in valid_batches)
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
        if not phase.config.ckpt.enable_save_ckpt:
            return
        self.optimizer.sync_params()
        meta = dict(
            version=1,
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
        )
        train_state = dict(loader=loader.state_dict(), history=self.history)
        path = self.ckpt.save(self.step, self.chunks, self.optimizer, train_state, meta)
        self.last_checkpoint = path
        self.logger.message(f"saved checkpoint {path}")
