"""Training metrics: one JSON line per event in ``metrics.jsonl``, the same scalars in TensorBoard, the
console (a progress bar on a terminal, plain step lines otherwise) and ``train.log``. Only the logging rank
(global rank 0) writes anything. Also the adaptive units the console and ``--dry-run`` print.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import warnings
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Mapping, Optional, TextIO

import torch

from internlm.faults import kill_now, kill_point


# ---------------------------------------------------------------------------------------------- units
def format_count(n: float, decimals: int = 2) -> str:
    """A count in k / M / B (B is the largest unit): ``950``, ``614.40k``, ``4.19M``, ``104.74B``, ``1,600.01B``."""
    if abs(n) < 999.5:
        return f"{n:,.0f}"
    for div, unit in ((1e3, "k"), (1e6, "M")):
        if round(abs(n) / div, decimals) < 1000:  # 999,999 is 1.00M, not 1,000.00k
            return f"{n / div:,.{decimals}f}{unit}"
    return f"{n / 1e9:,.{decimals}f}B"


def format_bytes(n: float) -> str:
    """Bytes in binary units: ``512 B``, ``3.5 KiB``, ``97.3 MiB``, ``1.2 GiB``, ``2.0 TiB``."""
    if abs(n) < 1024:
        return f"{n:,.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if abs(n) < 1023.95:
            return f"{n:,.1f} {unit}"
    return f"{n / 1024:,.1f} TiB"


def format_duration(seconds: float) -> str:
    """``0.4 s``, ``42 s``, ``3m12s``, ``5h07m``, ``12d04h``."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 9.95:
        return f"{max(seconds, 0.0):.1f} s"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


# ---------------------------------------------------------------------------------------------- JSON
def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float (nan, inf) replaced by None, in nested dicts and lists too: what
    ``json.dumps(..., allow_nan=False)`` accepts (metrics.jsonl stays strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


# ---------------------------------------------------------------------------------------------- memory
def peak_rss_bytes() -> Optional[int]:
    """The process's peak resident set size: ``VmHWM`` of /proc/self/status on Linux, else ``getrusage``'s
    ru_maxrss, else psutil's current RSS; None when none is available.

    Linux keeps ru_maxrss across ``execve``: a train.py started by a large parent (a launcher, a test runner) would
    report the parent's peak. VmHWM belongs to this process image only."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    try:
        import resource
    except ImportError:
        try:
            import psutil
        except ImportError:
            return None
        return int(psutil.Process().memory_info().rss)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def read_peak_memory(device: torch.device) -> Dict[str, float]:
    """Peak memory since the previous call, in GiB, for a logging step's metrics line.

    CUDA: ``mem_allocated_gib`` (tensors) and ``mem_reserved_gib`` (the caching allocator's segments), from the
    allocator's host-side counters (no device sync), whose peaks are then reset. CPU: ``mem_rss_gib``, the peak
    resident set size of the process so far (it cannot be reset)."""
    if device.type == "cuda":
        out = dict(
            mem_allocated_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 4),
            mem_reserved_gib=round(torch.cuda.max_memory_reserved(device) / 2**30, 4),
        )
        torch.cuda.reset_peak_memory_stats(device)
        return out
    rss = peak_rss_bytes()
    return {} if rss is None else dict(mem_rss_gib=round(rss / 2**30, 4))


def memory_text(record: Dict[str, Any]) -> Optional[str]:
    """The memory fields of a metrics line for the console (None when it has none)."""
    if "mem_allocated_gib" in record:
        allocated, reserved = record["mem_allocated_gib"] * 2**30, record["mem_reserved_gib"] * 2**30
        return f"mem {format_bytes(allocated)} ({format_bytes(reserved)} reserved)"
    if "mem_rss_gib" in record:
        return f"rss {format_bytes(record['mem_rss_gib'] * 2**30)}"
    return None


def progress_bar(done: int, total: int, width: int = 12) -> str:
    filled = int(width * done / total) if total else width
    return "[" + "#" * filled + "." * (width - filled) + "]"


def scalar_tag(key: str) -> str:
    """The TensorBoard / W&B name of a metrics.jsonl key: ``train/<key>``, ``valid/loss``, ``eval/<task>/<metric>``."""
    if key == "val_loss":
        return "valid/loss"
    return key if key.startswith("eval/") else f"train/{key}"


class MetricsLogger:
    """Appends metrics to work_dir/metrics.jsonl and TensorBoard; step lines, messages, warnings, the stop reason
    and the final line to work_dir/train.log (time-stamped); the console gets a progress bar redrawn in place on a
    terminal, else (nohup, Slurm, a pipe: ``console`` False) plain step lines."""

    def __init__(
        self,
        work_dir: str,
        enabled: bool,
        tensorboard: bool = True,
        console: Optional[bool] = None,
        wandb: Optional[Mapping[str, Any]] = None,
    ) -> None:
        self.enabled = enabled
        self.path = os.path.join(work_dir, "metrics.jsonl")
        self.log_path = os.path.join(work_dir, "train.log")
        self._tb = None
        self._bar: Optional[str] = None  # the progress bar line on the terminal, while one is drawn
        self._log_file = None
        self._console = console
        self._wandb = None  # a WandbLogger when monitor.wandb is set
        if not enabled:
            return
        os.makedirs(work_dir, exist_ok=True)
        self._log_file = open(self.log_path, "a")
        self._tb_dir = os.path.join(work_dir, "tensorboard") if tensorboard else None
        self._open_tensorboard(purge_step=None)
        if wandb:
            from .wandb_logger import WandbLogger

            self._wandb = WandbLogger(wandb, work_dir, scalar_tag)

    @property
    def out(self) -> TextIO:
        return sys.stdout

    @property
    def tty(self) -> bool:
        """Whether the console is a terminal (a progress bar redrawn in place) rather than a file or a pipe."""
        if self._console is not None:
            return self._console
        isatty = getattr(self.out, "isatty", None)
        return bool(isatty and isatty())

    def _open_tensorboard(self, purge_step: Optional[int]) -> None:
        if self._tb_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("tensorboard is not installed: TensorBoard logging is off", file=sys.stderr)
            self._tb_dir = None
            return
        if self._tb is not None:
            self._tb.close()
        self._tb = SummaryWriter(self._tb_dir, purge_step=purge_step)

    def truncate_after(self, step: int) -> None:
        """On resume from `step`: drop what a previous attempt logged after that step (it is recomputed)."""
        if not self.enabled:
            return
        if os.path.isfile(self.path):
            with open(self.path) as f:
                lines = f.readlines()
            kept = []
            for number, line in enumerate(lines, 1):
                try:
                    record = json.loads(line) if line.strip() else None
                except ValueError:  # a write cut short (kill, full disk): dropped, said once per line
                    where = "last line" if number == len(lines) else f"line {number}"
                    self.message(
                        f"warning: {self.path}: the {where} is not complete JSON (an append cut short by a "
                        f"kill or a full disk?); dropped"
                    )
                    continue
                if isinstance(record, dict) and record.get("step", 0) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)
        self._open_tensorboard(purge_step=step + 1)

    def log(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        text = json.dumps(strict_json(record), allow_nan=False)  # strict JSON: a non-finite value is null
        with open(self.path, "a") as f:
            if kill_point("metrics", record.get("step", -1)):  # tests only: kill -9 half-way through this append
                f.write(json.dumps(record)[:40])
                f.flush()
                kill_now()
            f.write(text + "\n")
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    if math.isfinite(value):
                        self._tb.add_scalar(scalar_tag(key), value, step)
        if self._wandb is not None:
            self._wandb.log(record)

    def step(self, head: str, fields: str, done: int, total: int, show: bool = True) -> None:
        """One training step: ``head`` (``phase1 step 120/300 (global 120/450)``) and its ``fields`` go to
        train.log; on the console the progress bar (``done`` of ``total`` global steps) is redrawn, or without a
        terminal a plain line printed, when ``show`` (every monitor.log_every steps and a phase's last)."""
        if not self.enabled:
            return
        self.log_only(f"{head} {fields}")
        if not show:
            return
        if not self.tty:
            print(f"{head} {fields}", file=self.out, flush=True)
            return
        # the bar line, cut to the terminal's width, redrawn in place (carriage return, erase to the line's end)
        width = shutil.get_terminal_size((120, 24)).columns
        self._bar = f"{head} {progress_bar(done, total)} {fields}"[: max(width - 1, 1)]
        self.out.write(f"\r{self._bar}\x1b[K")
        self.out.flush()

    def log_only(self, text: str) -> None:
        """A time-stamped line in train.log only (the console shows it otherwise, or not at all)."""
        if self.enabled and self._log_file is not None and not self._log_file.closed:
            self._log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
            self._log_file.flush()

    def message(self, text: str) -> None:
        """A line on the console (above the progress bar) and in train.log."""
        if not self.enabled:
            return
        self.log_only(text)
        if self._bar is not None:  # above the bar: erase it, print, redraw it
            self.out.write(f"\r\x1b[K{text}\n{self._bar}\x1b[K")
            self.out.flush()
        else:
            print(text, file=self.out, flush=True)

    def close_bar(self) -> None:
        """Leave the progress bar's last line on the console (at a phase's end)."""
        if self._bar is not None:
            self.out.write("\n")
            self.out.flush()
            self._bar = None

    def close(self) -> None:
        self.close_bar()
        if self._log_file is not None:
            self._log_file.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None


@contextmanager
def warnings_to_log(logger: MetricsLogger) -> Iterator[None]:
    """Python warnings raised meanwhile also go to ``logger``'s train.log (and are shown as usual)."""
    shown = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        logger.log_only(f"warning: {category.__name__}: {message} ({filename}:{lineno})")
        shown(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning
    try:
        yield
    finally:
        warnings.showwarning = shown
