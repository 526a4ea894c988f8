"""What the trainer prints around a run: the start-up banner (model, device, layout, phases, where the run
starts) and the final line."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from internlm.parallel import ParallelContext, describe_groups

from .metrics import format_count
from .phases import Phase


def final_line(summary: Dict[str, Any]) -> str:
    """``done: step 1,200, 4.92M tokens, last loss 2.3456, last validation loss 2.4567``."""
    text = f"done: step {summary['step']:,}, {format_count(summary['tokens'])} tokens"
    if summary["loss"] is not None:
        text += f", last loss {summary['loss']:.4f}"
    if summary["val_loss"] is not None:
        text += f", last validation loss {summary['val_loss']:.4f}"
    return text


def banner(
    phases: Sequence[Phase],
    model_config: Any,
    device: torch.device,
    pc: ParallelContext,
    work_dir: str,
    verified: Optional[Tuple[Optional[str], int]] = None,
) -> str:
    """The start-up banner: model, device, dtype, attention, layout, work_dir, where the run starts (``verified``:
    the checkpoint it resumes from and the damaged ones skipped, `ResumePlanner.verify_latest`); the rank formula
    and process groups when there are several processes (``pc``: the first phase's context)."""
    from internlm.model.attention import resolve_backend

    from .start_point import resume_point_text

    mc = model_config
    start, next_index = resume_point_text(list(phases), verified)
    layout = phases[min(next_index, len(phases) - 1)].layout
    try:
        attention = resolve_backend(mc.attn_backend, device, mc.dtype)
    except RuntimeError:
        attention = mc.attn_backend
    if device.type == "cuda":
        device_text = torch.cuda.get_device_name(device)
    else:
        threads = torch.get_num_threads()
        device_text = f"CPU ({threads} thread{'s' if threads != 1 else ''} per process)"
    processes = pc.world_size
    device_text += f" x {processes}" if processes > 1 else ""
    tokens = sum(p.steps * p.tokens_per_step for p in phases)
    steps = sum(p.steps for p in phases)
    listed = ", ".join(f"{p.name} {p.steps:,}" for p in phases)
    lines = [
        f"InternLM pretraining: {format_count(mc.num_params())} parameters (hidden {mc.hidden_size}, "
        f"{mc.num_layers} layers, vocab {mc.vocab_size}), {str(mc.dtype).replace('torch.', '')}, "
        f"attention {attention}",
        f"  device    {device_text}",
        f"  layout    {layout.describe()}",
        f"  phases    {listed} steps: {steps:,} steps, {format_count(tokens)} tokens",
        f"  work_dir  {work_dir}",
        f"  start     {start}",
    ]
    if processes > 1 and layout == pc.layout:
        lines += ["  " + line for line in describe_groups(pc).splitlines()]
    return "\n".join(lines)
