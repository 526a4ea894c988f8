"""The trainer's side of checkpoints: saving one (the meta.json record of the run), the background save in
flight and its completion, the previous phase's final checkpoint, and loading model and optimizer state from
one, resharded when another layout saved it. The format itself lives in checkpoint.py and its neighbours."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from typing import Any, Dict, Iterator, Optional

from internlm.checkpoint import META_FILE, accounted_bytes, latest_checkpoint, read_meta
from internlm.checkpoint.manager import NO_RECORDS, CheckpointManager
from internlm.checkpoint.reshard import (
    checkpoint_layout,
    load_model_resharded,
    load_optimizer_resharded,
    trainable_names,
)
from internlm.errors import CheckpointSaveError
from internlm.parallel import ParallelContext
from internlm.planning import checkpoint_bytes

from .health import HealthGuard
from .metrics import MetricsLogger, format_bytes
from .model_state import ModelState
from .phases import Phase, Progress


class Checkpointer:
    """Saves and loads the run's checkpoints under ``root`` (``ckpt.save_ckpt_folder``), keeping ``keep_last``.

    A save with ``ckpt.async_save`` stays in flight until `finish_saves` (the next save, a rollback, a layout
    change, the end of training or a stop); it is then committed by the manager of the layout that wrote it."""

    def __init__(
        self, root: str, keep_last: int, model_config: Any, pc: ParallelContext, logger: MetricsLogger
    ) -> None:
        self.root = root
        self.keep_last = keep_last
        self.model_config = model_config  # the run's (every phase trains the same model): meta.json's model_config
        self.logger = logger
        self.last_path: Optional[str] = None  # the newest checkpoint this process saved (or is saving)
        self._current = CheckpointManager(root, pc, keep_last=keep_last)  # of the current layout's ranks
        self._in_flight: Optional[CheckpointManager] = None  # the manager of a background save to complete

    def _manager(self, model: ModelState) -> CheckpointManager:
        """The manager of the current layout's ranks (a new one after a layout change)."""
        if self._current.pc is not model.pc:
            self._current = CheckpointManager(self.root, model.pc, keep_last=self.keep_last)
        return self._current

    @property
    def last_complete(self) -> Optional[str]:
        """The newest checkpoint this process saved, unless its background save has not completed."""
        return self.last_path if self._in_flight is None else None

    def save(
        self,
        model: ModelState,
        phase: Phase,
        phase_step: int,
        completed: bool,
        progress: Progress,
        loader: Any,
        health: HealthGuard,
    ) -> None:
        """Save checkpoint ``progress.step`` (collective) of ``phase`` after its step ``phase_step``
        (``completed``: the phase's last), unless saving is off or the run is unhealthy."""
        if not phase.config.ckpt.enable_save_ckpt or not health.may_save(progress.step):  # none while unhealthy
            return
        self.finish_saves()  # the previous save, if still being written, completes first
        model.optimizer.sync_params()
        loader_state = loader.state_dict()
        meta = dict(
            version=2,
            step=progress.step,
            tokens=progress.tokens,
            phase_index=phase.index,
            phase_name=phase.name,
            phase_step=phase_step,
            phase_steps=phase.steps,
            phase_completed=completed,
            phase_tokens=progress.history[-1]["tokens"],
            phases=progress.history,
            config_file=phase.config_file,
            layout=model.pc.layout.to_dict(),
            model_config=self.model_config.to_dict(),
            data=loader_state,
            **health.meta(),  # health and skip_batches
        )
        train_state = dict(loader=loader_state, history=progress.history, **health.state_dict())
        async_save = phase.config.ckpt.async_save
        manager = self._manager(model)
        with self._save_failure():
            path = manager.save(progress.step, model.chunks, model.optimizer, train_state, meta, async_save=async_save)
        self.last_path = path
        if async_save:
            self._in_flight = manager  # completed by the next save, the end of training or a stop
            self.logger.message(f"saving checkpoint {path} in the background")
        else:
            self.logger.message(f"saved checkpoint {path}")

    def finish_saves(self) -> None:
        """Wait for a checkpoint being written in the background (ckpt.async_save) and complete it
        (collective: every rank calls this at the same point)."""
        manager = self._in_flight
        if manager is not None and manager.pending:
            started = time.perf_counter()
            with self._save_failure():
                path = manager.finish()
            self.logger.message(f"saved checkpoint {path} (waited {time.perf_counter() - started:.1f} s)")
        self._in_flight = None  # only now: an abort while waiting must not count the save as complete

    def abandon_saves(self) -> None:
        """Stop a background save without completing it (an abort, a crash): its writer thread is joined, so
        none is left running at interpreter exit; the checkpoint does not count (`last_complete`)."""
        if self._in_flight is not None:
            self._in_flight.abandon()

    @contextlib.contextmanager
    def _save_failure(self) -> Iterator[None]:
        """A failed save's `CheckpointSaveError` with what to do: on a full disk, the space one checkpoint takes
        (the files of the newest complete one as its meta.json accounts them, else `checkpoint_bytes`' estimate)
        against the space free; then where a rerun resumes."""
        try:
            yield
        except CheckpointSaveError as exc:
            latest = latest_checkpoint(self.root)
            resume = f"rerun to resume from {latest}" if latest else "rerun (no checkpoint yet: it starts afresh)"
            if os.strerror(errno.ENOSPC) not in str(exc) and NO_RECORDS not in str(exc):
                raise CheckpointSaveError(f"{exc}; fix the file system, then {resume}") from None
            need = accounted_bytes(latest) if latest else None
            size = f"{format_bytes(need)} (as {latest} holds)" if need else None
            if size is None:  # no checkpoint yet: the estimate start-up checked the free space against
                estimate = format_bytes(checkpoint_bytes(self.model_config)["total"])
                size = f"about {estimate} (weights + fp32 optimizer state)"
            free = format_bytes(shutil.disk_usage(self.root).free) if os.path.isdir(self.root) else "?"
            raise CheckpointSaveError(
                f"{exc}; one checkpoint of this model takes {size} and {self.root} has {free} free: free space, "
                f"lower ckpt.keep_last or point ckpt.save_ckpt_folder at a larger disk, then {resume}"
            ) from None

    def phase_end_checkpoint(self, phase: Phase, step: int) -> str:
        """The final checkpoint of the phase before ``phase`` (saved by this process at ``step``), to reshard
        from."""
        self.finish_saves()
        path = self.last_path
        meta = read_meta(path) if path else None
        if meta is None or meta["step"] != step or not meta["phase_completed"]:
            raise RuntimeError(
                f"phase {phase.name!r} changes the parallel layout, which goes through the previous phase's final "
                f"checkpoint, but none was saved at step {step} (ckpt.enable_save_ckpt is off?)"
            )
        return path

    def load_model(self, path: str, model: ModelState) -> bool:
        """Load the model chunks from checkpoint ``path``: the exact per-rank files when it was saved under
        this layout, else resharded from full tensors. Returns True when resharded."""
        # a folder without meta.json (e.g. ckpt.load_ckpt_folder from elsewhere) can only be read as it is
        saved = checkpoint_layout(path) if os.path.isfile(os.path.join(path, META_FILE)) else None
        if saved is None or saved == model.pc.layout:
            self._manager(model).load_model(path, model.chunks)
            return False
        load_model_resharded(path, model.chunks)
        self.logger.message(f"resharded checkpoint from {saved.describe()} to {model.pc.layout.describe()} ({path})")
        return True

    def load_optimizer(self, path: str, model: ModelState) -> None:
        """Optimizer state from checkpoint ``path``: this rank's shard file when saved under this layout, else
        this rank's owned slices copied parameter by parameter out of the saved shards (memory-mapped)."""
        if checkpoint_layout(path) == model.pc.layout:
            self._manager(model).load_optimizer(path, model.optimizer)
        else:
            load_optimizer_resharded(path, model.optimizer, trainable_names(model.chunks))

    def load_train_state(self, path: str, model: ModelState, restore_rng: bool = True) -> Dict[str, Any]:
        """This rank's RNG states restored (unless ``restore_rng`` is False); returns the rank-0 train state
        (data position, phase history, health), which is layout independent."""
        return self._manager(model).load_train_state(path, restore_rng=restore_rng)
