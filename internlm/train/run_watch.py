"""What watches a run from outside the step's arithmetic: the hang watchdog (watchdog.py), the straggler detector
(stragglers.py) and the alerts (alerts.py), built from the ``monitor`` section and called from a few lines of the
trainer (step start, logging step, health decision) and of run.py (start, end)."""

from __future__ import annotations

from typing import Any, Optional

import torch

from internlm.config.compat import alert_webhooks

from .alerts import Alerts
from .distributed import restart_count
from .health import HealthDecision
from .metrics import MetricsLogger
from .stragglers import StragglerDetector
from .watchdog import HangWatchdog, hang_timeout


class RunWatch:
    """The watchdog, straggler detector and alerts of one process (``off()``: all three do nothing)."""

    def __init__(self, watchdog: HangWatchdog, stragglers: StragglerDetector, alerts: Alerts) -> None:
        self.watchdog = watchdog
        self.stragglers = stragglers
        self.alerts = alerts

    @classmethod
    def off(cls) -> "RunWatch":
        return cls(HangWatchdog(0, ".", 0), StragglerDetector(0, 0, 1, torch.device("cpu")), Alerts([], "", 0, False))

    @classmethod
    def build(cls, config: Any, rank: int, world_size: int, device: torch.device) -> "RunWatch":
        """From the run-wide config (the first phase's): monitor.hang_timeout_s (with parallel.timeout_minutes),
        monitor.straggler_factor, monitor.alert (rank 0 sends)."""
        monitor = config.monitor
        alerts = Alerts(alert_webhooks(monitor.alert), config.JOB_NAME, rank, enabled=rank == 0)

        limit = hang_timeout(monitor.hang_timeout_s, config.parallel.timeout_minutes)
        watchdog = HangWatchdog(limit, config.work_dir, rank)

        def on_hang(message: str, step: int) -> None:
            alerts.send("hang", message, step=step, stacks=watchdog.path)
            alerts.flush()  # bounded (alerts.TIMEOUT_S per request): the process exits right after

        watchdog.on_hang = on_hang
        return cls(watchdog, StragglerDetector(monitor.straggler_factor, rank, world_size, device), alerts)

    # ------------------------------------------------------------------ run.py
    def started(self, work_dir: str) -> None:
        """The run starts: a ``start`` alert, or ``restart`` on a torchrun restart."""
        attempt = restart_count()
        if attempt:
            self.alerts.send(
                "restart",
                f"torchrun restarted the workers (attempt {attempt}); resuming from the last complete checkpoint",
                attempt=attempt,
                work_dir=work_dir,
            )
        else:
            self.alerts.send("start", f"training started in {work_dir}", work_dir=work_dir)

    def finished(self, status: int, reason: str) -> None:
        """The run ends with exit ``status``: the watchdog stops, a ``stop`` alert is delivered (bounded wait)."""
        self.watchdog.close()
        text = f"exit status {status}: {reason}"
        self.alerts.send("stop", text, status=status, reason=reason, attempt=restart_count())
        self.alerts.close()

    # ------------------------------------------------------------------ trainer.py
    def step_started(self, step: int) -> None:
        """Global step ``step`` starts: the hang limit starts again."""
        self.watchdog.arm(step)

    def idle(self) -> None:
        """Between steps (a checkpoint load, a phase change): no hang limit until the next step starts."""
        self.watchdog.disarm()

    def logging_step(self, step: int, logger: MetricsLogger) -> None:
        """At a logging step (every rank, after the metrics read-back): compare the ranks' step times."""
        self.stragglers.report(step, logger.message, logger.log)

    def health(self, decision: HealthDecision, step: Optional[int]) -> None:
        """A health decision: anything but continue is an ``unhealthy`` alert."""
        if not decision.proceed:
            self.alerts.send("unhealthy", decision.reason, action=decision.action, step=step, checkpoint=decision.path)


__all__ = ["RunWatch"]
