"""Training metrics: one JSON line per event in ``metrics.jsonl``, the same scalars in TensorBoard,
and a console progress bar. Only the logging rank (global rank 0) writes anything.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Dict, Optional

import torch

# Dense bf16 peak TFLOP/s of common accelerators, for MFU.
_GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def device_peak_tflops(device: torch.device, override: Optional[float] = None) -> float:
    """Peak TFLOP/s of one device, the denominator of MFU.

    GPUs: the vendor's dense bf16 figure for known cards. CPUs have no single published figure, so
    the peak is measured: the best fp32 matmul throughput of a short probe (under a second). On a
    busy machine the probe reads low, so CPU MFU is a rough figure.
    """
    if override:
        return float(override)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in _GPU_PEAK_TFLOPS.items():
            if key in name:
                return value
        return 312.0
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = 0.0
    deadline = time.perf_counter() + 0.5
    for _ in range(20):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
        if time.perf_counter() > deadline:
            break
    return best / 1e12


class MetricsLogger:
    """Appends metrics to work_dir/metrics.jsonl and TensorBoard; draws a progress bar on the console."""

    def __init__(self, work_dir: str, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = os.path.join(work_dir, "metrics.jsonl")
        self._tb = None
        self._bar = None
        if not enabled:
            return
        os.makedirs(work_dir, exist_ok=True)
        self._log_file = open(os.path.join(work_dir, "train.log"), "a")
        self._tb_dir = os.path.join(work_dir, "tensorboard") if tensorboard else None
        self._open_tensorboard(purge_step=None)

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
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)
        self._open_tensorboard(purge_step=step + 1)

    def log(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    if math.isfinite(value):
                        self._tb.add_scalar(f"train/{key}" if key != "val_loss" else "valid/loss", value, step)

    def progress(
        self, phase: str, step: int, first_step: int, last_step: int, loss: float, tokens_per_s: float
    ) -> None:
        """Progress bar line: phase, step, loss, tokens/s and ETA of the current phase."""
        if not self.enabled:
            return
        if self._bar is None or self._bar.desc != phase:
            self.close_bar()
            from tqdm import tqdm

            self._bar = tqdm(
                total=last_step,
                initial=first_step - 1,
                desc=phase,
                unit="step",
                dynamic_ncols=True,
                file=sys.stdout,
                mininterval=0.5,
            )
        self._bar.set_postfix_str(f"loss={loss:.4f} tok/s={tokens_per_s:,.0f}", refresh=False)
        self._bar.update(step - self._bar.n)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        self._log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
        self._log_file.flush()
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self.close_bar()
        if self.enabled:
            self._log_file.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
