"""``profile = dict(start_step=..., end_step=..., memory=False)``: torch.profiler traces of a few global steps.

Every rank writes ``{work_dir}/profile/trace_rank{r}_steps{a}-{b}.pt.trace.json`` (Chrome trace JSON: open it in
https://ui.perfetto.dev, chrome://tracing or TensorBoard's profiler plugin). With ``memory=True`` the trace also
records allocations (``profile_memory``) and, on CUDA, the allocator's history is dumped as
``memory_rank{r}_steps{a}-{b}.pickle`` (drag it into https://pytorch.org/memory_viz).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, List, Optional

import torch


class StepProfiler:
    """Starts torch.profiler before global step ``start_step`` and writes the trace after ``end_step`` (or at the
    end of the run, when it stops earlier). A run resumed inside the window profiles its remaining steps."""

    def __init__(
        self, section: Any, work_dir: str, device: torch.device, rank: int, message: Callable[[str], None]
    ) -> None:
        self.start: Optional[int] = section.start_step
        self.end: Optional[int] = section.end_step if section.end_step is not None else section.start_step
        self.memory = bool(section.memory)
        self.folder = os.path.join(work_dir, "profile")
        self.device = device
        self.rank = rank
        self.message = message  # rank 0's console and train.log (a no-op on other ranks)
        self._profiler = None
        self._first: Optional[int] = None
        self._last: Optional[int] = None
        self._cuda_history = False
        self.written: List[str] = []  # paths of the files written by this rank

    @property
    def enabled(self) -> bool:
        return self.start is not None

    @property
    def active(self) -> bool:
        return self._profiler is not None

    def before_step(self, step: int) -> None:
        """Called before global step ``step`` runs: starts profiling at the window's first step."""
        if not self.enabled or self.active or self._first is not None or not self.start <= step <= self.end:
            return
        os.makedirs(self.folder, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            if self.memory:
                torch.cuda.memory._record_memory_history(max_entries=200_000)
                self._cuda_history = True
        elif self.memory:
            self.message(
                "warning: profile.memory: memory snapshots need CUDA; on this device the trace records allocations only"
            )
        self._profiler = torch.profiler.profile(activities=activities, profile_memory=self.memory, record_shapes=False)
        self._profiler.__enter__()
        self._first = step
        self.message(f"profiling steps {step}..{self.end} into {self.folder}")

    def step_range(self, step: int):
        """A context naming global step ``step`` in the trace (a no-op when not profiling)."""
        if self.active:
            return torch.profiler.record_function(f"step {step}")
        return contextlib.nullcontext()

    def after_step(self, step: int) -> None:
        """Called after global step ``step``: writes the trace after the window's last step."""
        if self.active:
            self._last = step
            if step >= self.end:
                self.finish()

    def finish(self) -> None:
        """Stop profiling (if active) and write the files: at the window's end, or when the run ends first."""
        if not self.active:
            return
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        last = self._last if self._last is not None else self._first
        tag = f"rank{self.rank}_steps{self._first}-{last}"
        path = os.path.join(self.folder, f"trace_{tag}.pt.trace.json")
        profiler.export_chrome_trace(path)
        self.written.append(path)
        written = f"wrote profiler trace {path}"
        if self._cuda_history:
            snapshot = os.path.join(self.folder, f"memory_{tag}.pickle")
            torch.cuda.memory._dump_snapshot(snapshot)
            torch.cuda.memory._record_memory_history(enabled=None)
            self._cuda_history = False
            self.written.append(snapshot)
            written += f" and memory snapshot {snapshot}"
        self.message(written)
