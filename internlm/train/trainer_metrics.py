"""The trainer's metrics flush: the steps' device values read back with one ``tolist()`` at the logging steps,
their ``metrics.jsonl`` lines (step time, tokens per GPU per second, TFLOPS, MFU, peak memory) and their console /
train.log line (with the ETA over all phases).
"""

from __future__ import annotations

import math
import time
from typing import Any, Dict, List

import torch

from .fp16_metrics import FP16_KEYS, read_fp16_metrics
from .metrics import format_count, format_duration, memory_text, read_peak_memory
from .phases import Phase


class MetricsMixin:
    """The metrics part of `Trainer` (trainer.py): reads ``pc``, ``device``, ``model_config``, ``guard``,
    ``logger``, ``_peak_tflops``, ``_global_total``, ``_later_flops``; keeps ``_pending`` (the steps not yet read
    back), ``_window_start``, ``_skipped_steps``, ``_flop_rate``, ``_mem_text`` and ``last_loss``."""

    def _flush_metrics(self, phase: Phase, check_stop: bool = False) -> bool:
        """Write the metrics lines of the steps since the last flush; returns whether to stop.

        Their losses, grad norms and skip flags (device tensors, or Python numbers from an optimizer that
        returns them) and, with ``check_stop``, the all-reduced stop request (`_stop_flags`, a collective: call
        it at the same steps on every rank) are read back with one ``tolist()``: the one host sync of the step
        loop. Step time is the host time since the last flush (or validation / save) over its steps: with
        asynchronous execution that is the device time of those steps.
        """
        if not self._pending and not check_stop:
            return False
        values: List[Any] = []
        for line in self._pending:
            values += [line["loss"], line["grad_norm"], line["skipped"]]
            values += [line[key] for key in FP16_KEYS if key in line]  # device tensors of fp16 loss scaling
        if check_stop:
            values += list(self._stop_flags(phase).unbind())
        host = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in values]).tolist()
        now = time.perf_counter()
        stop = False
        if check_stop:
            stop = self._stop_decision(host[-2], host[-1])
        lines, self._pending = self._pending, []
        if lines:
            elapsed = max(now - self._window_start, 1e-9) / len(lines)
            flops_per_step = self._flops_per_step(phase)
            tflops = flops_per_step / self.pc.world_size / elapsed / 1e12
            rate = flops_per_step / elapsed  # the whole job's FLOP/s, for the ETA (smoothed over flushes)
            self._flop_rate = rate if self._flop_rate is None else 0.7 * self._flop_rate + 0.3 * rate
            # peak memory since the previous reading: allocator counters / getrusage, no device sync
            lines[-1].update(read_peak_memory(self.device))
            log_every = phase.config.monitor.log_every
            offset = 0
            for line in lines:
                fp16 = [key for key in FP16_KEYS if key in line]
                loss, grad_norm, skipped, *fp16_values = host[offset : offset + 3 + len(fp16)]
                offset += 3 + len(fp16)
                self._skipped_steps += int(skipped > 0)
                line.update(loss=loss, grad_norm=grad_norm, skipped=skipped > 0, skipped_steps=self._skipped_steps)
                line.update(read_fp16_metrics(fp16, fp16_values))
                line.update(
                    tgs=phase.tokens_per_step / self.pc.world_size / elapsed,
                    tflops=tflops,
                    mfu=None if self._peak_tflops is None else tflops / self._peak_tflops,
                    step_time=elapsed,
                )
                self.guard.observe(line)  # counts non-finite steps and spikes, says why (health.py)
                self.logger.log(line)
                if line.get("overflow"):
                    self.logger.message(
                        f"step {line['step']} skipped: fp16 gradient overflow, loss scale now {line['loss_scale']:g}"
                    )
                show = line["phase_step"] % log_every == 0 or line["phase_step"] == phase.steps
                self._console_step(phase, line, show)
            self.last_loss = lines[-1]["loss"]
        self._window_start = now
        self.guard.after_flush()  # health decisions, at the flush: `UnhealthyStop` or `Rollback`
        return stop

    def _flops_per_step(self, phase: Phase) -> float:
        """Model FLOPs of one step of ``phase`` over the whole job (forward and backward)."""
        return self.model_config.flops_per_token(phase.config.data.seq_len) * phase.tokens_per_step

    def _console_step(self, phase: Phase, line: Dict[str, Any], show: bool) -> None:
        """A step's line for the console and train.log: ``phase1 step 120/300 (global 120/450)``, the ETA over
        all phases (the remaining FLOPs at the measured FLOP rate), loss, lr, gradient norm, TFLOPS and MFU,
        peak memory, skipped steps and tokens so far."""
        remaining = (phase.steps - line["phase_step"]) * self._flops_per_step(phase) + self._later_flops
        eta = remaining / self._flop_rate if self._flop_rate else math.inf
        self._mem_text = memory_text(line) or self._mem_text
        head = f"{phase.name} step {line['phase_step']}/{phase.steps} (global {line['step']}/{self._global_total})"
        fields = [
            f"ETA {format_duration(eta)}",
            f"loss {line['loss']:.4f}",
            f"lr {line['lr']:.2e}",
            f"grad {line['grad_norm']:.3g}",
            f"{line['tflops']:.3g} TFLOPS, MFU {'n/a' if line['mfu'] is None else format(line['mfu'], '.1%')}",
        ]
        if self._mem_text:
            fields.append(self._mem_text)
        fields += [f"skipped {line['skipped_steps']}", f"{format_count(line['tokens'])} tokens"]
        if line.get("loss_spikes"):
            fields.insert(-1, f"spikes {line['loss_spikes']}")
        if "loss_scale" in line:  # fp16: the dynamic loss scale and the overflow steps skipped so far
            fields.insert(-1, f"scale {line['loss_scale']:g}, overflows {line['overflow_steps']}")
        self.logger.step(head, " | ".join(fields), line["step"], self._global_total, show)
