"""Training health: steps skipped on a non-finite loss or gradient norm, loss spikes, skipped batches, and the
health record of checkpoints.

The trainer's steps are sync-free: losses and gradient norms stay device tensors until the logging step's one
read-back (``monitor.log_every``, `MetricsReporter.flush`). Every decision here is taken there, on the host values
of the steps read back, in step order; with ``log_every=1`` that is at every step. All ranks read the same values
(the loss is all-reduced, the norm is global), so they take the same decisions at the same step.

* A step whose loss or gradient norm is not finite was skipped on the device by the optimizer (its norm check, and
  the trainer's flag for a non-finite global loss: masters, moments and step counts unchanged); `HealthMonitor`
  counts it (``nonfinite_steps``) and the run of them in a row (``consecutive``). An
  fp16 overflow the loss scaler absorbs (``overflow`` in the metrics line) is routine: neither counted nor reset.
* ``health.max_skipped_steps`` in a row: the run stops (`UnhealthyStop`, exit code 3), or rolls back: a
  `HealthDecision` value the trainer's step loop acts on.
* A loss spike: ``loss > spike_factor * mean(window)``, the window being the previous ``spike_window`` losses of
  steps that were neither skipped nor spikes; checked once the window is full.
* While the last step read back was skipped the run is unhealthy: no checkpoint is saved.
* ``health.rollback``: on a spike, or on the limit above, the newest healthy checkpoint before the offending steps
  is reloaded and their batches skipped (`SkipBatches`, ``data.skip_batches`` syntax), recorded in checkpoints.

Checkpoints record ``health`` in meta.json (`checkpoint_healthy`); `mark_unhealthy` flags one afterwards (the
checkpoint whose weights produced the skipped steps). Resume, rollback and pruning use the newest healthy one.
"""

from __future__ import annotations

import math
import os
from collections import deque
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Literal, Mapping, Optional

from internlm.checkpoint import checkpoint_healthy, complete_checkpoints, read_meta, rewrite_meta
from internlm.config.step_ranges import SkipBatches
from internlm.parallel.comm import default_group_barrier

from .metrics import MetricsLogger


class UnhealthyStop(Exception):
    """Training stopped unhealthy (too many non-finite steps in a row, or no healthy checkpoint to resume from);
    the message says what happened and what to do. Exit code 3."""


@dataclass(frozen=True)
class HealthDecision:
    """What the trainer does after a health check: ``action`` "continue"; "stop" (`UnhealthyStop` with
    ``reason``); "rollback" (reload checkpoint ``path``, the newest healthy one before the offending steps, whose
    batches are now in the skip set; ``reason`` says why). At start-up a "continue" decision's ``path`` is the
    checkpoint to resume from."""

    action: Literal["continue", "stop", "rollback"] = "continue"
    reason: str = ""
    path: Optional[str] = None

    @property
    def proceed(self) -> bool:
        return self.action == "continue"


CONTINUE = HealthDecision()


# ---------------------------------------------------------------------------------------------- monitor
@dataclass(frozen=True)
class Verdict:
    """What one step read back was: ``nonfinite`` (skipped, counted), ``spike``, ``overflow`` (routine fp16)."""

    nonfinite: bool = False
    spike: bool = False
    overflow: bool = False


class HealthMonitor:
    """The host-side health state of a run (see the module docstring for the rules).

    ``max_skipped_steps`` 0 never stops; ``spike_factor`` 0 detects no spikes.
    """

    def __init__(self, max_skipped_steps: int, spike_factor: float, spike_window: int) -> None:
        self.max_skipped_steps = int(max_skipped_steps)
        self.spike_factor = float(spike_factor)
        self.window: deque = deque(maxlen=max(int(spike_window), 1))
        self.consecutive = 0  # steps skipped in a row on a non-finite loss or gradient norm, up to the last read
        self.streak_start: Optional[int] = None  # the first step of that run of skipped steps
        self.last_step = 0  # the last step observed
        self.nonfinite_steps = 0
        self.loss_spikes = 0
        self.rollbacks = 0

    @classmethod
    def from_config(cls, health: Any) -> "HealthMonitor":
        """From a typed ``health`` config section."""
        return cls(health.max_skipped_steps, health.spike_factor, health.spike_window)

    def observe(self, step: int, loss: float, grad_norm: float, skipped: bool, overflow: bool = False) -> Verdict:
        """Account for one step read back: its loss, gradient norm and whether the optimizer skipped it
        (``overflow``: skipped on an fp16 overflow the loss scaler absorbed)."""
        self.last_step = step
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if overflow and math.isfinite(loss):
            return Verdict(overflow=True)
        if skipped or not finite:
            self.consecutive += 1
            self.nonfinite_steps += 1
            if self.streak_start is None:
                self.streak_start = step
            return Verdict(nonfinite=True)
        self.consecutive, self.streak_start = 0, None
        full = len(self.window) == self.window.maxlen
        if self.spike_factor > 0 and full and loss > self.spike_factor * self.moving_average():
            self.loss_spikes += 1
            return Verdict(spike=True)
        self.window.append(loss)
        return Verdict()

    def moving_average(self) -> float:
        """Mean of the window (nan while it is empty)."""
        return sum(self.window) / len(self.window) if self.window else math.nan

    @property
    def healthy(self) -> bool:
        """The last step read back was not skipped on a non-finite value: checkpoints may be saved."""
        return self.consecutive == 0

    @property
    def exhausted(self) -> bool:
        """``max_skipped_steps`` (> 0) steps in a row were skipped: stop or roll back."""
        return self.max_skipped_steps > 0 and self.consecutive >= self.max_skipped_steps

    def record(self) -> Dict[str, Any]:
        """meta.json's ``health``: ``healthy`` and the counters."""
        return dict(
            healthy=self.healthy,
            nonfinite_steps=self.nonfinite_steps,
            loss_spikes=self.loss_spikes,
            rollbacks=self.rollbacks,
        )

    def state_dict(self) -> Dict[str, Any]:
        """What a checkpoint's train state keeps: the counters and the loss window."""
        return dict(self.record(), window=list(self.window))

    def load_state_dict(self, state: Optional[Mapping[str, Any]], counters: bool = True) -> None:
        """Restore a saved state (None: a checkpoint from before health records: nothing to restore); with
        ``counters`` False (a rollback) only the loss window, the counters keep counting what happened."""
        self.consecutive, self.streak_start = 0, None
        if not state:
            return
        self.window.clear()
        self.window.extend(float(v) for v in state.get("window", []))
        if counters:
            self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
            self.loss_spikes = int(state.get("loss_spikes", 0))
            self.rollbacks = int(state.get("rollbacks", 0))


# ---------------------------------------------------------------------------------------------- checkpoints
def mark_unhealthy(path: str, reason: str) -> None:
    """Record in checkpoint ``path``'s meta.json that it is not healthy, and why (meta.json is rewritten
    atomically; it is not among the files its checksums cover). Rank 0 only."""
    meta = read_meta(path)
    meta["health"] = dict(meta.get("health") or {}, healthy=False, reason=reason)
    rewrite_meta(path, meta)


def record_skip_batches(path: str, skip: SkipBatches) -> None:
    """Write ``skip`` into checkpoint ``path``'s meta.json ``skip_batches`` (a rollback target: a resume from it
    keeps skipping the offending steps even when no later checkpoint is saved). Rank 0 only."""
    meta = read_meta(path)
    meta["skip_batches"] = str(skip)
    rewrite_meta(path, meta)


def healthy_checkpoints(root: str, below: Optional[int] = None) -> List[int]:
    """Steps of the complete, healthy checkpoints under ``root`` (those before step ``below`` if given), oldest
    first. A meta.json that cannot be read counts as not healthy."""
    steps = [step for step in complete_checkpoints(root) if below is None or step < below]
    return [step for step in steps if checkpoint_healthy(os.path.join(root, str(step)))]


def newest_healthy_checkpoint(root: str, below: Optional[int] = None) -> Optional[str]:
    """The path of the newest healthy checkpoint (before step ``below`` if given), or None."""
    steps = healthy_checkpoints(root, below)
    return os.path.join(root, str(steps[-1])) if steps else None


# ---------------------------------------------------------------------------------------------- the trainer's side
def _steps_text(first: int, last: int) -> str:
    """``"5"`` or ``"5-7"`` (data.skip_batches syntax)."""
    return str(first) if first == last else f"{first}-{last}"


def _steps_words(first: int, last: int) -> str:
    """``"step 5"`` or ``"steps 5-7"``."""
    return f"step {first}" if first == last else f"steps {first}-{last}"


class HealthGuard:
    """What the trainer asks about health: which steps to skip (`skips`), what each step read back was
    (`observe`, at the metrics flush), whether to stop or roll back (`review`, a `HealthDecision`), whether a
    checkpoint may be saved (`may_save`), what checkpoints record (`meta`, `state_dict`) and where to resume
    (`healthy_resume`).

    ``health``: the typed ``health`` config section; ``skip_texts``: every phase's ``data.skip_batches``;
    ``root``: the checkpoint folder; ``logger``: rank 0's console and train.log. Every method is called at the
    same point on every rank, with the same values.
    """

    def __init__(self, health: Any, skip_texts: Iterable[str], root: str, rank0: bool, logger: MetricsLogger) -> None:
        self.monitor = HealthMonitor.from_config(health)
        self.rollback = bool(health.rollback)
        self.skip = SkipBatches(skip_texts)
        self.root = root
        self.rank0 = rank0
        self.logger = logger
        self._spike: Optional[int] = None  # the first spike of the steps read back by the current flush

    # ------------------------------------------------------------------ steps
    def skips(self, step: int) -> bool:
        """Whether global ``step``'s batch is skipped (data.skip_batches, and the steps rollbacks added)."""
        return step in self.skip

    def observe(self, line: Dict[str, Any]) -> Verdict:
        """Account for one step's metrics line (host values) and add ``loss_spikes`` and ``nonfinite_steps`` to it;
        says why on the console when the step was skipped on a non-finite value or is a spike."""
        m = self.monitor
        average = m.moving_average()
        overflow = bool(line.get("overflow"))
        verdict = m.observe(line["step"], line["loss"], line["grad_norm"], bool(line["skipped"]), overflow)
        line.update(loss_spikes=m.loss_spikes, nonfinite_steps=m.nonfinite_steps)
        if verdict.nonfinite:
            limit = f"the run stops at {m.max_skipped_steps}" if m.max_skipped_steps else "no limit"
            self.logger.message(
                f"warning: step {line['step']} skipped: loss {line['loss']:.4g}, gradient norm {line['grad_norm']:.4g} "
                f"({m.consecutive} in a row; {limit}: health.max_skipped_steps)"
            )
        elif verdict.spike:
            self._spike = line["step"] if self._spike is None else self._spike
            self.logger.message(
                f"warning: step {line['step']}: loss spike, {line['loss']:.4f} > {m.spike_factor:g} x {average:.4f} "
                f"(the mean of the previous {len(m.window)} losses; health.spike_factor, spike_window); "
                f"{m.loss_spikes} so far"
            )
        return verdict

    def acting(self, at_end: bool = False) -> bool:
        """Whether `review` will stop or roll back (after a flush, or ``at_end`` of training): it then reads and
        marks the checkpoints, so a checkpoint still being written must be completed first."""
        if at_end:
            return not self.monitor.healthy
        return self.monitor.exhausted or (self._spike is not None and self.rollback)

    def review(self, at_end: bool = False) -> HealthDecision:
        """After a flush's lines: stop or roll back on ``max_skipped_steps`` non-finite steps in a row; with
        ``health.rollback``, roll back on a spike (when a checkpoint precedes it). ``at_end`` of training: a run
        whose last steps were skipped on non-finite values did not finish well."""
        if at_end:
            return self._unhealthy() if not self.monitor.healthy else CONTINUE
        spike, self._spike = self._spike, None
        if self.monitor.exhausted:
            return self._unhealthy()
        if spike is not None and self.rollback:
            return self._roll_back(spike, spike, below=spike, why=f"loss spike at step {spike}") or CONTINUE
        return CONTINUE

    def may_save(self, step: int) -> bool:
        """Whether a checkpoint may be saved now (not while the last step read back was skipped)."""
        m = self.monitor
        if m.healthy:
            return True
        self.logger.message(
            f"warning: no checkpoint saved at step {step}: the run is unhealthy "
            f"({_steps_words(m.streak_start, m.last_step)} skipped on a non-finite loss or gradient norm)"
        )
        return False

    # ------------------------------------------------------------------ stop, roll back
    def _unhealthy(self) -> HealthDecision:
        """Mark the checkpoint whose weights gave the skipped steps, then roll back (health.rollback) or stop."""
        m = self.monitor
        first, last = m.streak_start, m.last_step
        # skipped steps change no weight: the weights that gave them are those after step first - 1
        suspect = os.path.join(self.root, str(first - 1))
        marked = first > 1 and (first - 1) in healthy_checkpoints(self.root)
        if marked and self.rank0:
            mark_unhealthy(suspect, f"its weights gave non-finite losses or gradient norms at steps {first}-{last}")
        default_group_barrier()
        steps = _steps_words(first, last)
        if self.rollback:
            decision = self._roll_back(
                max(first - 1, 1), last, below=first, why=f"{steps} skipped on non-finite values"
            )
            if decision is not None:
                return decision
        healthy = newest_healthy_checkpoint(self.root)
        resume = f"a rerun resumes from {healthy}" if healthy else "no healthy checkpoint is left"
        reason = (
            f"stopped unhealthy after step {last}: {steps} ({last - first + 1} in a row; health.max_skipped_steps="
            f"{m.max_skipped_steps}) had a non-finite loss or gradient norm and were skipped, and no checkpoint was "
            f"saved since. "
            + (f"Checkpoint {suspect} is marked unhealthy: its weights gave those steps. " if marked else "")
            + f"Lower adam.lr, or skip those batches (data.skip_batches='{_steps_text(max(first - 1, 1), last)}'), "
            f"or set health.rollback=True; {resume}"
        )
        return HealthDecision("stop", reason)

    def _roll_back(self, first: int, last: int, below: int, why: str) -> Optional[HealthDecision]:
        """Roll back to the newest healthy checkpoint before step ``below``, skipping steps first..last from now on
        (also written into that checkpoint's meta.json); None when there is no such checkpoint."""
        target = newest_healthy_checkpoint(self.root, below=below)
        if target is None:
            self.logger.message(f"warning: {why}: no healthy checkpoint before step {below} to roll back to")
            return
        self.skip.add(first, last)
        if self.rank0:
            record_skip_batches(target, self.skip)
        default_group_barrier()
        self.monitor.rollbacks += 1
        self.logger.message(
            f"warning: {why}: rolling back to {target} (health.rollback); the batches of "
            f"{_steps_words(first, last)} are skipped (data.skip_batches now '{self.skip}')"
        )
        return HealthDecision("rollback", why, target)

    # ------------------------------------------------------------------ checkpoints
    def meta(self) -> Dict[str, Any]:
        """meta.json's ``health`` and ``skip_batches``."""
        return dict(health=self.monitor.record(), skip_batches=str(self.skip))

    def state_dict(self) -> Dict[str, Any]:
        """The train state's ``health`` (counters, loss window) and ``skip_batches``."""
        return dict(health=self.monitor.state_dict(), skip_batches=str(self.skip))

    def restore(self, meta: Mapping[str, Any], train_state: Mapping[str, Any], rolling_back: bool) -> None:
        """After loading a checkpoint: its skipped steps join ours; its health state is restored (on a rollback
        only the loss window: the counters go on counting)."""
        self.skip.add_text(meta.get("skip_batches", ""))
        self.monitor.load_state_dict(train_state.get("health"), counters=not rolling_back)

    def healthy_resume(self, latest: Optional[str], rolling_back: bool) -> HealthDecision:
        """Continue from ``latest`` (its ``path``), or when that one is marked unhealthy from the newest healthy one
        before it (said on the console unless ``rolling_back``); stop when there is none."""
        if latest is None or checkpoint_healthy(latest):
            return HealthDecision(path=latest)
        meta = read_meta(latest)
        reason = meta["health"].get("reason", "no reason recorded")
        healthy = newest_healthy_checkpoint(self.root, below=int(meta["step"]))
        if healthy is None:
            return HealthDecision(
                "stop",
                f"checkpoint {latest} is marked unhealthy ({reason}) and no healthy checkpoint precedes it in "
                f"{self.root}; remove the cause (e.g. lower adam.lr), then move the checkpoint folders out of "
                f"{self.root} to start from scratch",
            )
        if not rolling_back:
            self.logger.message(f"warning: checkpoint {latest} is marked unhealthy ({reason}); resuming from {healthy}")
        return HealthDecision(path=healthy)


__all__ = [
    "UnhealthyStop",
    "HealthDecision",
    "Verdict",
    "HealthMonitor",
    "HealthGuard",
    "mark_unhealthy",
    "record_skip_batches",
    "healthy_checkpoints",
    "newest_healthy_checkpoint",
]
