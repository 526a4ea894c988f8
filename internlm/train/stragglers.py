"""Slow ranks named: every rank's forward/backward time, gathered at logging steps (Megatron's and InternLM's
straggler detection).

Each rank times its forward and backward passes (`StragglerDetector.begin` / `end` around them in the step runner;
on CUDA with events, read only at the logging step, so a step issues no host sync of its own). At every logging
step (``monitor.log_every``) one small all_gather over the world collects each rank's mean time per step since the
previous one; a rank with

    time[r] > monitor.straggler_factor x median_low(time)

is warned about by rank and host in one console line (rank 0). ``median_low``: the lower middle value for an even
world, so in a world of 2 the reference is the faster rank. The forward/backward section is used, not the whole
step: every rank waits in the step's collectives for the slowest one, so whole steps take the same time everywhere.
The times go to metrics.jsonl as one record per logging step: ``step_time_ranks`` (seconds per step, by rank),
``step_time_median``, ``step_time_max`` and ``slowest_rank``.
"""

from __future__ import annotations

import socket
import statistics
import time
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist


class StragglerDetector:
    """Times this rank's forward/backward passes and compares the ranks at logging steps (``report``).
    ``factor`` 0 or a world of one: off (``begin`` / ``end`` / ``report`` do nothing)."""

    def __init__(self, factor: float, rank: int, world_size: int, device: torch.device) -> None:
        self.factor = float(factor)
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.enabled = self.factor > 0 and world_size > 1
        self._host_seconds = 0.0
        self._started: Optional[float] = None
        self._events: List[Any] = []  # CUDA: (start, end) event pairs of the steps since the last report
        self._steps = 0
        self._hosts: Optional[List[str]] = None

    def begin(self) -> None:
        """The forward/backward passes of a step start."""
        if not self.enabled:
            return
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._events.append([start, None])
        else:
            self._started = time.perf_counter()

    def end(self) -> None:
        """They end (before the step's first collective after the backward pass)."""
        if not self.enabled:
            return
        if self.device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events[-1][1] = end
        elif self._started is not None:
            self._host_seconds += time.perf_counter() - self._started
            self._started = None
        self._steps += 1

    def _local_seconds(self) -> float:
        """This rank's mean forward/backward seconds per step since the last report (0 when none ran)."""
        if self._events:  # the logging step's read-back has synchronised the device: the events are complete
            self._events[-1][1].synchronize()
            self._host_seconds = sum(s.elapsed_time(e) for s, e in self._events if e is not None) / 1000.0
            self._events = []
        seconds = self._host_seconds / self._steps if self._steps else 0.0
        self._host_seconds, self._steps = 0.0, 0
        return seconds

    def report(self, step: int, warn: Callable[[str], None], log: Callable[[Dict[str, Any]], None]) -> None:
        """At logging step ``step`` (every rank, a collective): gather the ranks' times, ``warn`` about each slow
        rank in one line and ``log`` the metrics record (both rank 0's logger: the callables do nothing elsewhere)."""
        if not self.enabled:
            return
        if self._hosts is None:  # once: which host each rank runs on, for the warning line
            hosts: List[Any] = [None] * self.world_size
            dist.all_gather_object(hosts, socket.gethostname())
            self._hosts = [str(h) for h in hosts]
        mine = torch.tensor([self._local_seconds()], dtype=torch.float64, device=self.device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine)
        times = [round(t, 6) for t in torch.cat(gathered).tolist()]  # microseconds: enough for a metrics line
        if not any(times):  # no step since the last report (a flush before a save, say)
            return
        median = statistics.median_low(times)
        slowest = max(range(len(times)), key=times.__getitem__)
        log(
            dict(
                step=step,
                step_time_ranks=times,
                step_time_median=median,
                step_time_max=times[slowest],
                slowest_rank=slowest,
            )
        )
        for rank, seconds in enumerate(times):
            if median > 0 and seconds > self.factor * median:
                warn(
                    f"warning: step {step}: rank {rank} ({self._hosts[rank]}) is slow: forward/backward "
                    f"{seconds:.3f} s per step, {seconds / median:.1f}x the median {median:.3f} s of "
                    f"{len(times)} ranks (monitor.straggler_factor {self.factor:g}); check that host's device"
                )


__all__ = ["StragglerDetector"]
