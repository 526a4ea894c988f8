"""What the trainer prints around a run: the start-up banner (model, device, layout, phases, where the run
starts) and the final line."""

from __future__ import annotations

from typing import Any, Dict

import torch

from internlm.parallel import describe_groups

from .metrics import format_count


class BannerMixin:
    """The banner part of `Trainer` (trainer.py): reads ``logger``, ``model_config``, ``phases``, ``device``,
    ``pc``, ``work_dir`` and ``_global_total``."""

    def _final_line(self, summary: Dict[str, Any]) -> str:
        text = f"done: step {summary['step']:,}, {format_count(summary['tokens'])} tokens"
        if summary["loss"] is not None:
            text += f", last loss {summary['loss']:.4f}"
        if summary["val_loss"] is not None:
            text += f", last validation loss {summary['val_loss']:.4f}"
        return text

    def _banner(self) -> None:
        """The start-up banner (rank 0): model, device, dtype, attention, layout, work_dir, where the run starts;
        the rank formula and process groups when there are several processes."""
        if not self.logger.enabled:
            return
        from internlm.model.attention import resolve_backend

        from .start_point import resume_point_text

        mc = self.model_config
        start, next_index = resume_point_text(self.phases)
        layout = self.phases[min(next_index, len(self.phases) - 1)].layout
        try:
            attention = resolve_backend(mc.attn_backend, self.device, mc.dtype)
        except RuntimeError:
            attention = mc.attn_backend
        if self.device.type == "cuda":
            device = torch.cuda.get_device_name(self.device)
        else:
            threads = torch.get_num_threads()
            device = f"CPU ({threads} thread{'s' if threads != 1 else ''} per process)"
        processes = self.pc.world_size
        device += f" x {processes}" if processes > 1 else ""
        tokens = sum(p.steps * p.tokens_per_step for p in self.phases)
        phases = ", ".join(f"{p.name} {p.steps:,}" for p in self.phases)
        lines = [
            f"InternLM pretraining: {format_count(mc.num_params())} parameters (hidden {mc.hidden_size}, "
            f"{mc.num_layers} layers, vocab {mc.vocab_size}), {str(mc.dtype).replace('torch.', '')}, "
            f"attention {attention}",
            f"  device    {device}",
            f"  layout    {layout.describe()}",
            f"  phases    {phases} steps: {self._global_total:,} steps, {format_count(tokens)} tokens",
            f"  work_dir  {self.work_dir}",
            f"  start     {start}",
        ]
        if processes > 1 and layout == self.pc.layout:
            lines += ["  " + line for line in describe_groups(self.pc).splitlines()]
        self.logger.message("\n".join(lines))
