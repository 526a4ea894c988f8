"""`train.py --dry-run`: the plan of every phase, without touching a device or a process group.

Memory per device (bytes), for the most loaded pipeline stage:

    weights      P_dev * bytes(dtype)                      P_dev = parameters of the stage / tensor size
    gradients    P_dev * 4                                 fp32 accumulation buffers
    optimizer    P_dev * 12 / zero1                        fp32 master + Adam exp_avg + exp_avg_sq, sharded
    activations  L_stage * in_flight * act_layer           1F1B keeps up to `pipeline` micro-batches in flight

where act_layer = tokens * hidden * 34 / tensor bytes per layer and micro-batch with fused attention and
sequence parallelism (Korthikanti et al. 2022; without sequence parallelism 10 of the 34 stay unsplit),
or tokens * hidden * 2 bytes with full activation checkpointing (only the layer input is kept).
"""

from __future__ import annotations

import json
import math
import os
from typing import List, Optional

from .lr_schedule import warmup_cosine_lr
from .phases import Phase

# Throughput assumed when none is given or measured: 40% MFU on a 312 TFLOP/s (A100/A800-class) device,
# the hardware InternLM was trained on.
_ASSUMED_PEAK_TFLOPS = 312.0
_ASSUMED_MFU = 0.4


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _measured_tgs(work_dir: str) -> Optional[float]:
    path = os.path.join(work_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    values = []
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if "tgs" in record:
                values.append(record["tgs"])
    values = values[-20:]
    return sorted(values)[len(values) // 2] if values else None


def _layout_line(phase: Phase) -> str:
    layout = phase.layout
    return (
        f"{layout.world_size} devices = tensor {layout.tensor} x pipeline {layout.pipeline} (chunks "
        f"{layout.num_chunks}) x data {layout.data}; zero1 {layout.zero1}; sequence parallel "
        f"{layout.sequence_parallel}"
    )


def memory_per_device(phase: Phase) -> dict:
    config, layout = phase.config, phase.layout
    mc = config.model_config
    tp, pp = layout.tensor, layout.pipeline
    layers = math.ceil(mc.num_layers / pp)
    per_layer = (
        mc.num_params(include_embedding=False) - mc.hidden_size - mc.vocab_size * mc.hidden_size
    ) / mc.num_layers
    stage_params = layers * per_layer + mc.vocab_size * mc.hidden_size  # + embedding (first) or head (last)
    p_dev = stage_params / tp
    dtype_bytes = 2 if "16" in str(mc.dtype) else 4
    tokens = config.data.micro_bsz * config.data.seq_len
    ckpt = config.model.checkpoint
    if ckpt is True or (not isinstance(ckpt, bool) and float(ckpt) >= 1.0):
        act_layer = tokens * mc.hidden_size * 2
    else:
        split = 34 if layout.sequence_parallel else 24
        act_layer = tokens * mc.hidden_size * (split / tp + (34 - split))
    in_flight = min(pp, config.data.micro_num)
    out = dict(
        weights=p_dev * dtype_bytes,
        gradients=p_dev * 4,
        optimizer=p_dev * 12 / layout.zero1,
        activations=layers * in_flight * act_layer,
    )
    out["total"] = sum(out.values())
    return out


def print_plan(phases: List[Phase], throughput: Optional[float] = None) -> None:
    """Print the plan of every phase (``throughput``: tokens per device per second for the time estimates)."""
    first = phases[0].config
    world_size = phases[0].layout.world_size
    mc = first.model_config
    print(
        f"model: {mc.num_params() / 1e9:.2f}B parameters (hidden {mc.hidden_size}, {mc.num_layers} layers, "
        f"{mc.num_attention_heads} heads, vocab {mc.vocab_size}, {str(mc.dtype).replace('torch.', '')})"
    )
    previous_layout = _layout_line(phases[0])
    print(f"layout: {previous_layout}")
    measured = _measured_tgs(first.work_dir)
    total_tokens = total_seconds = 0.0
    for phase in phases:
        config = phase.config
        tgs = throughput or measured
        source = "given" if throughput else ("measured" if measured else "assumed 40% MFU of 312 TFLOP/s")
        if tgs is None:
            tgs = _ASSUMED_MFU * _ASSUMED_PEAK_TFLOPS * 1e12 / mc.flops_per_token(config.data.seq_len)
        tokens = phase.steps * phase.tokens_per_step
        seconds = tokens / (tgs * world_size)
        total_tokens += tokens
        total_seconds += seconds
        lr_total = phase.lr_total_steps
        lr_args = (lr_total, config.adam.lr, config.lr_scheduler.warmup_ratio, config.lr_scheduler.eta_min)
        warmup = int(round(config.lr_scheduler.warmup_ratio * lr_total))
        mixture = (
            config.data.train_folder if isinstance(config.data.train_folder, dict) else {config.data.train_folder: 1.0}
        )
        weight_sum = sum(mixture.values()) or 1.0
        mem = memory_per_device(phase)
        print(f"\nphase {phase.index + 1} {phase.name!r} ({phase.config_file})")
        layout = _layout_line(phase)
        if layout != previous_layout:
            print(f"  layout: {layout} (resharded from the previous phase's final checkpoint)")
        previous_layout = layout
        print(
            f"  steps {phase.steps:,} x {phase.global_batch_sequences:,} sequences x seq_len {config.data.seq_len:,} "
            f"= {tokens / 1e9:,.2f}B tokens ({phase.tokens_per_step / 1e6:,.2f}M tokens/step; micro_bsz "
            f"{config.data.micro_bsz}, micro_num {config.data.micro_num})"
        )
        names = [os.path.basename(os.path.normpath(k)) for k in mixture]
        if len(set(names)) < len(names):  # folder names clash: show full paths
            names = list(mixture)
        print("  data mixture: " + ", ".join(f"{n} {w / weight_sum:.1%}" for n, w in zip(names, mixture.values())))
        print(
            f"  learning rate: warm-up {warmup:,} steps to {config.adam.lr:g}, cosine to "
            f"{warmup_cosine_lr(lr_total - 1, *lr_args):.3g} (eta_min {config.lr_scheduler.eta_min:g}); "
            f"weight decay {config.adam.weight_decay:g}; clip {config.hybrid_zero_optimizer.clip_grad_norm:g}; "
            f"optimizer state {'reset' if config.phase.reset_optimizer else 'carried over'}"
        )
        print(
            f"  memory per device: {_gib(mem['total'])} (weights {_gib(mem['weights'])}, gradients "
            f"{_gib(mem['gradients'])}, optimizer {_gib(mem['optimizer'])}, activations {_gib(mem['activations'])})"
        )
        print(f"  time: {seconds / 3600:,.1f} h at {tgs:,.0f} tokens/device/s ({source})")
    print(f"\ntotal: {total_tokens / 1e9:,.2f}B tokens in {total_seconds / 86400:,.1f} days on {world_size} devices")
