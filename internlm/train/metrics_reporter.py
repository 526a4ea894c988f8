"""The steps' metrics between logging steps and their report: the device values of every pending step read back
with one ``tolist()`` at a flush, their ``metrics.jsonl`` lines (step time, tokens per GPU per second, TFLOPS,
MFU, peak memory) and their console / train.log line (with the ETA over all phases).
"""

from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from .fp16_metrics import FP16_KEYS, read_fp16_metrics
from .health import HealthGuard
from .metrics import MetricsLogger, format_count, format_duration, memory_text, read_peak_memory
from .phases import Phase


class MetricsReporter:
    """Keeps the metrics lines of the steps not yet read back (``pending``, device tensors) and writes them at a
    flush. ``model_config``: the run's model (FLOPs per token); ``peak_tflops``: the device's peak (None: no MFU);
    ``total_steps``: the global steps of every phase (the progress bar's total before the first phase)."""

    def __init__(
        self,
        logger: MetricsLogger,
        device: torch.device,
        model_config: Any,
        peak_tflops: Optional[float],
        total_steps: int,
    ) -> None:
        self.logger = logger
        self.device = device
        self.model_config = model_config
        self.peak_tflops = peak_tflops
        self.pending: List[Dict[str, Any]] = []
        self.last_loss: Optional[float] = None  # of the last step read back
        self.window_start = time.perf_counter()  # host time of the last flush (or validation / save)
        self.skipped_steps = 0  # the optimizer's skipped steps up to the last metrics line written
        # console progress: global steps and FLOPs of the phases after the current one, the measured FLOP rate
        self.global_total = total_steps
        self.later_flops = 0.0
        self.flop_rate: Optional[float] = None
        self.mem_text: Optional[str] = None  # the last memory reading, for the console
        self.first_line = True  # the run's first metrics line also carries the optimizer state's bytes

    def begin_phase(self, phase: Phase, later: Sequence[Phase], steps_before: int, skipped_steps: int) -> None:
        """A phase starts: ``later`` phases follow it, ``steps_before`` global steps precede its first;
        ``skipped_steps``: the optimizer's count so far, then counted from the steps' skip flags as read back."""
        self.global_total = steps_before + phase.steps + sum(p.steps for p in later)
        self.later_flops = sum(self.flops_per_step(p) * p.steps for p in later)
        self.window_start = time.perf_counter()
        self.skipped_steps = skipped_steps

    def add(self, line: Dict[str, Any], optimizer: Any) -> None:
        """A trained step's metrics line, its loss / grad norm / skip flag still device tensors."""
        if self.first_line:
            line["optim_state_bytes"] = optimizer.optim_state_bytes()
            self.first_line = False
        self.pending.append(line)

    def restart_window(self) -> None:
        """Step time is measured from now (after a validation or a save)."""
        self.window_start = time.perf_counter()

    def drop_pending(self) -> None:
        """Forget the steps not yet read back (a rollback recomputes them)."""
        self.pending = []

    def flush(
        self, phase: Phase, world_size: int, health: HealthGuard, extra: Optional[torch.Tensor] = None
    ) -> Optional[List[float]]:
        """Write the metrics lines of the steps since the last flush; returns ``extra`` read back (``[]`` when not
        given), or None when there was nothing to do (no line pending, no ``extra``).

        Their losses, grad norms and skip flags (device tensors, or Python numbers from an optimizer that
        returns them) and ``extra`` (the agreed stop request) are read back with one ``tolist()``: the one host
        sync of the step loop. Step time is the host time since the last flush (or validation / save) over its
        steps: with asynchronous execution that is the device time of those steps. ``health`` observes every line
        (non-finite steps, spikes: its warnings come before the line).
        """
        if not self.pending and extra is None:
            return None
        values: List[Any] = []
        for line in self.pending:
            values += [line["loss"], line["grad_norm"], line["skipped"]]
            values += [line[key] for key in FP16_KEYS if key in line]  # device tensors of fp16 loss scaling
        if extra is not None:
            values += list(extra.unbind())
        host = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in values]).tolist()
        extra_values = host[len(host) - extra.numel() :] if extra is not None else []
        now = time.perf_counter()
        lines, self.pending = self.pending, []
        if lines:
            elapsed = max(now - self.window_start, 1e-9) / len(lines)
            flops_per_step = self.flops_per_step(phase)
            tflops = flops_per_step / world_size / elapsed / 1e12
            rate = flops_per_step / elapsed  # the whole job's FLOP/s, for the ETA (smoothed over flushes)
            self.flop_rate = rate if self.flop_rate is None else 0.7 * self.flop_rate + 0.3 * rate
            # peak memory since the previous reading: allocator counters / getrusage, no device sync
            lines[-1].update(read_peak_memory(self.device))
            log_every = phase.config.monitor.log_every
            offset = 0
            for line in lines:
                fp16 = [key for key in FP16_KEYS if key in line]
                loss, grad_norm, skipped, *fp16_values = host[offset : offset + 3 + len(fp16)]
                offset += 3 + len(fp16)
                self.skipped_steps += int(skipped > 0)
                line.update(loss=loss, grad_norm=grad_norm, skipped=skipped > 0, skipped_steps=self.skipped_steps)
                line.update(read_fp16_metrics(fp16, fp16_values))
                line.update(
                    tgs=phase.tokens_per_step / world_size / elapsed,
                    tflops=tflops,
                    mfu=None if self.peak_tflops is None else tflops / self.peak_tflops,
                    step_time=elapsed,
                )
                health.observe(line)  # counts non-finite steps and spikes, says why (health.py)
                self.logger.log(line)
                if line.get("overflow"):
                    self.logger.message(
                        f"step {line['step']} skipped: fp16 gradient overflow, loss scale now {line['loss_scale']:g}"
                    )
                show = line["phase_step"] % log_every == 0 or line["phase_step"] == phase.steps
                self._console_step(phase, line, show)
            self.last_loss = lines[-1]["loss"]
        self.window_start = now
        return extra_values

    def flops_per_step(self, phase: Phase) -> float:
        """Model FLOPs of one step of ``phase`` over the whole job (forward and backward)."""
        return self.model_config.flops_per_token(phase.config.data.seq_len) * phase.tokens_per_step

    def _console_step(self, phase: Phase, line: Dict[str, Any], show: bool) -> None:
        """A step's line for the console and train.log: ``phase1 step 120/300 (global 120/450)``, the ETA over
        all phases (the remaining FLOPs at the measured FLOP rate), loss, lr, gradient norm, TFLOPS and MFU,
        peak memory, skipped steps and tokens so far."""
        remaining = (phase.steps - line["phase_step"]) * self.flops_per_step(phase) + self.later_flops
        eta = remaining / self.flop_rate if self.flop_rate else math.inf
        self.mem_text = memory_text(line) or self.mem_text
        head = f"{phase.name} step {line['phase_step']}/{phase.steps} (global {line['step']}/{self.global_total})"
        fields = [
            f"ETA {format_duration(eta)}",
            f"loss {line['loss']:.4f}",
            f"lr {line['lr']:.2e}",
            f"grad {line['grad_norm']:.3g}",
            f"{line['tflops']:.3g} TFLOPS, MFU {'n/a' if line['mfu'] is None else format(line['mfu'], '.1%')}",
        ]
        if self.mem_text:
            fields.append(self.mem_text)
        fields += [f"skipped {line['skipped_steps']}", f"{format_count(line['tokens'])} tokens"]
        if line.get("loss_spikes"):
            fields.insert(-1, f"spikes {line['loss_spikes']}")
        if "loss_scale" in line:  # fp16: the dynamic loss scale and the overflow steps skipped so far
            fields.insert(-1, f"scale {line['loss_scale']:g}, overflows {line['overflow_steps']}")
        self.logger.step(head, " | ".join(fields), line["step"], self.global_total, show)
