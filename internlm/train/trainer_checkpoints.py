"""The trainer's side of checkpoints: saving one (the meta.json record of the run), waiting for a background
save, and loading model and optimizer state from one, resharded when another layout saved it."""

from __future__ import annotations

import os
import time

from internlm.checkpoint import META_FILE, read_meta
from internlm.checkpoint.reshard import (
    checkpoint_layout,
    load_model_resharded,
    load_optimizer_resharded,
    trainable_names,
)

from .phases import Phase


class CheckpointMixin:
    """The checkpoint part of `Trainer` (trainer.py): reads ``ckpt`` (its `CheckpointManager`), ``pc``,
    ``chunks``, ``optimizer``, ``guard``, ``history``, ``model_config``, ``step``, ``tokens``; keeps
    ``last_checkpoint`` and ``_ckpt_in_flight`` (a background save to complete)."""

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

    def _finish_saves(self) -> None:
        """Wait for a checkpoint being written in the background (ckpt.async_save) and complete it
        (collective: every rank calls this at the same point)."""
        manager = getattr(self, "_ckpt_in_flight", None)
        self._ckpt_in_flight = None
        if manager is not None and manager.pending:
            started = time.perf_counter()
            path = manager.finish()
            self.logger.message(f"saved checkpoint {path} (waited {time.perf_counter() - started:.1f} s)")

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
