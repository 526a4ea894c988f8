"""Stop requests of a training run: SIGTERM or Ctrl-C (finish the step, save, stop; a second Ctrl-C aborts),
and InternLM's ``ckpt.stop_file_path`` (stop after the step written in the file). The request is agreed on by
every rank at the logging steps (`StopController.flags`, all-reduced, read back with the metrics).
"""

from __future__ import annotations

import math
import os
import signal
import threading
from types import FrameType
from typing import Optional

import torch
import torch.distributed as dist

from internlm.parallel import all_reduce_

from .metrics import MetricsLogger
from .phases import Phase


class StopRequested(Exception):
    """Training stopped early on request (ckpt.stop_file_path, SIGTERM, Ctrl-C) after saving a checkpoint."""


class Aborted(Exception):
    """Training aborted at once by a second Ctrl-C, without saving (the message says where a rerun resumes)."""


class StopController:
    """Whether and when the run stops on request. ``saves``: whether a stop saves a checkpoint (the first
    phase's ``ckpt.enable_save_ckpt``, for the Ctrl-C message); ``logger``: rank 0's console and train.log."""

    def __init__(self, saves: bool, rank: int, logger: MetricsLogger) -> None:
        self.saves = saves
        self.rank = rank
        self.logger = logger
        self.terminated = False  # SIGTERM or a first Ctrl-C: stop at the next logging step
        self.interrupted = False  # a first Ctrl-C was pressed: the next one aborts
        self.stop_at: Optional[int] = None  # a later step a stop file named, agreed on by every rank
        self._warned_stop_text: Optional[str] = ""  # the unusable stop file content last warned about

    def install_handlers(self) -> None:
        """SIGTERM (a scheduler's preemption) or a first Ctrl-C: finish the step, save, stop; a second Ctrl-C
        aborts at once without saving (`Aborted`). Only the main thread may install signal handlers."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.on_signal)
            signal.signal(signal.SIGINT, self.on_signal)

    def on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        """The SIGTERM / SIGINT handler."""
        if signum == signal.SIGINT and self.interrupted:
            raise KeyboardInterrupt  # the second Ctrl-C: `Trainer.run` turns it into `Aborted`, skipping every save
        self.terminated = True
        if signum == signal.SIGINT:
            self.interrupted = True
            then = "saving a checkpoint" if self.saves else "stopping"
            self.logger.message(f"Ctrl-C: {then} after this step (press again to abort without saving)")

    def flags(self, phase: Phase, step: int, device: torch.device, world_size: int) -> torch.Tensor:
        """This rank's stop request as ``[stop now, -(step named by the stop file)]``, all-reduced (max) over the
        world so that every rank reads the same values: a file appearing mid-step cannot split the job.

        Stop after SIGTERM, or as InternLM's ckpt.stop_file_path asks: after the step written in that file
        (after this step, if it is empty). A collective: every rank calls it at the same (logging) steps.
        """
        path = phase.config.ckpt.stop_file_path
        target = self._file_target(path, step) if path and os.path.isfile(path) else math.inf
        flags = torch.tensor([1.0 if self.terminated else 0.0, -target], dtype=torch.float64, device=device)
        if world_size > 1:
            all_reduce_(flags, dist.group.WORLD, op=dist.ReduceOp.MAX)
        return flags

    def _file_target(self, path: str, step: int) -> float:
        """The step the stop file names: its number, ``step`` when it is empty, inf (no stop) when it is anything
        else or cannot be read, which is warned about once per content (a typo must not go unnoticed)."""
        try:
            with open(path) as f:
                text = f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            text, problem = None, f"cannot be read ({exc})"
        else:
            if not text:
                return step
            if text.isdigit():
                return int(text)
            problem = f"reads {text[:40]!r}, not a step number"
        if text != self._warned_stop_text:
            self._warned_stop_text = text
            self.logger.message(
                f"warning: ckpt.stop_file_path {path} {problem}: ignored; write the global step to stop after "
                f"(e.g. '{step + 1}'), or leave the file empty to stop after the current step"
            )
        return math.inf

    def decide(self, now: float, minus_target: float, step: int) -> bool:
        """Whether to stop after ``step``, from the agreed `flags` read back; a stop file naming a later step is
        remembered (``stop_at``) and honoured at that step without another collective (`due`)."""
        target = -minus_target
        if now > 0 or target <= step:
            return True
        if math.isfinite(target):
            self.stop_at = int(target)
        return self.due(step)

    def due(self, step: int) -> bool:
        """Whether ``step`` is the step (or past the step) a stop file named, agreed on at an earlier logging step."""
        return self.stop_at is not None and step >= self.stop_at

    def reason(self, phase: Phase, step: int) -> str:
        """The stop request is honoured (its checkpoint saved): remove the stop file (rank 0) and say why the run
        stops (`StopRequested`'s message)."""
        path = phase.config.ckpt.stop_file_path
        if self.rank == 0 and path and os.path.isfile(path) and not self.terminated:
            os.remove(path)
        why = "on a stop signal" if self.terminated else f"as asked by {path}"
        return f"stopped after step {step} {why}; rerun the same command to resume"
