"""Stop requests of a training run: SIGTERM or Ctrl-C (finish the step, save, stop; a second Ctrl-C aborts),
and InternLM's ``ckpt.stop_file_path`` (stop after the step written in the file). The request is agreed on by
every rank at the logging steps (`StopMixin._stop_flags`, all-reduced with the metrics read-back).
"""

from __future__ import annotations

import math
import os
import signal

import torch
import torch.distributed as dist

from internlm.parallel import all_reduce_

from .phases import Phase


class StopRequested(Exception):
    """Training stopped early on request (ckpt.stop_file_path) after saving a checkpoint."""


class Aborted(Exception):
    """Training aborted at once by a second Ctrl-C, without saving (the message says where a rerun resumes)."""


class StopMixin:
    """The stop-request part of `Trainer` (trainer.py): reads ``phases``, ``logger``, ``step``, ``pc``,
    ``device``; keeps ``_terminated``, ``_interrupted`` (set by the signal handlers) and ``_stop_at``."""

    def _on_stop_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self._interrupted:
            raise KeyboardInterrupt  # the second Ctrl-C: `run` turns it into `Aborted`, skipping every save
        self._terminated = True
        if signum == signal.SIGINT:
            self._interrupted = True
            then = "saving a checkpoint" if self.phases[0].config.ckpt.enable_save_ckpt else "stopping"
            self.logger.message(f"Ctrl-C: {then} after this step (press again to abort without saving)")

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
