"""`train.py --dry-run`: what every phase would do, without touching a device or a process group.

Per phase: layout, batch, data mixture, learning rate, memory per device (`internlm.planning.memory_per_device`:
the most loaded pipeline stage), time at a given, measured or assumed throughput, and the start-up estimate
(`internlm.planning.startup`); before them where the run starts (`resume_point_text`).
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

from internlm.planning import (
    PLANNER_DEVICES,
    StartupProbe,
    measure_startup,
    memory_per_device,
    most_loaded_stage_params,
    planned_attn_backend,
    startup_estimate,
    step_communication,
)

from .lr_schedule import warmup_cosine_lr
from .metrics import format_bytes, format_count, format_duration
from .phases import Phase
from .start_point import resume_point_text

# Throughput assumed when none is given or measured: 40% MFU on an A100 (312 TFLOP/s, the device table's figure),
# the hardware InternLM was trained on.
_ASSUMED_PEAK_TFLOPS = PLANNER_DEVICES["a100-80gb"].peak_tflops
_ASSUMED_MFU = 0.4
_ASSUMED_TEXT = f"assumed {_ASSUMED_MFU:.0%} MFU of {_ASSUMED_PEAK_TFLOPS:g} TFLOP/s"


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


def print_dry_run(phases: List[Phase], throughput: Optional[float] = None) -> None:
    """Print what every phase would do (``throughput``: tokens per device per second for the time estimates)."""
    first = phases[0].config
    world_size = phases[0].layout.world_size
    mc = first.model_config
    print(
        f"model: {format_count(mc.num_params())} parameters (hidden {mc.hidden_size}, {mc.num_layers} layers, "
        f"{mc.num_attention_heads} heads, vocab {mc.vocab_size}, {str(mc.dtype).replace('torch.', '')})"
    )
    previous_layout = phases[0].layout.describe("sentence")
    print(f"layout: {previous_layout}")
    start, _ = resume_point_text(phases)
    print(f"start: {start}")
    measured = _measured_tgs(first.work_dir)
    probes: Dict[int, StartupProbe] = {}  # tensor size -> measurement (taken once per tensor size)
    total_tokens = total_seconds = 0.0
    for phase in phases:
        config = phase.config
        tgs = throughput or measured
        source = "given" if throughput else ("measured" if measured else _ASSUMED_TEXT)
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
        mem = memory_per_device(
            mc,
            phase.layout,
            config.data.micro_bsz,
            config.data.seq_len,
            config.data.micro_num,
            config.model.checkpoint,
            fused_loss=config.model.fused_loss,
        )
        print(f"\nphase {phase.index + 1} {phase.name!r} ({phase.config_file})")
        layout = phase.layout.describe("sentence")
        if layout != previous_layout:
            print(f"  layout: {layout} (resharded from the previous phase's final checkpoint)")
        previous_layout = layout
        print(
            f"  steps {phase.steps:,} x {phase.global_batch_sequences:,} sequences x seq_len {config.data.seq_len:,} "
            f"= {format_count(tokens)} tokens ({format_count(phase.tokens_per_step)} tokens/step; micro_bsz "
            f"{config.data.micro_bsz}, micro_num {config.data.micro_num})"
        )
        names = [os.path.basename(os.path.normpath(k)) for k in mixture]
        if len(set(names)) < len(names):  # folder names clash: show full paths
            names = list(mixture)
        print("  data mixture: " + ", ".join(f"{n} {w / weight_sum:.1%}" for n, w in zip(names, mixture.values())))
        if phase.index == 0:
            state = "fresh"
        else:
            state = "reset (phase.reset_optimizer)" if config.phase.reset_optimizer else "carried over"
        print(
            f"  learning rate: warm-up {warmup:,} steps to {config.adam.lr:g}, cosine to "
            f"{warmup_cosine_lr(lr_total - 1, *lr_args):.3g} (eta_min {config.lr_scheduler.eta_min:g}); "
            f"weight decay {config.adam.weight_decay:g}; clip {config.hybrid_zero_optimizer.clip_grad_norm:g}; "
            f"optimizer state {state}"
        )
        print(
            f"  memory per device: {format_bytes(mem['total'])} (weights {format_bytes(mem['weights'])}, gradients "
            f"{format_bytes(mem['gradients'])}, optimizer {format_bytes(mem['optimizer'])}, activations "
            f"{format_bytes(mem['activations'])}, transient {format_bytes(mem['transient'])}; attention "
            f"{planned_attn_backend(mc)}, activation checkpointing {config.model.checkpoint})"
        )
        if phase.layout.context > 1:  # context-parallel traffic, the one new cost next to the smaller activations
            data = config.data
            comm = step_communication(
                mc, phase.layout, data.micro_bsz, data.seq_len, data.micro_num, config.model.checkpoint
            )
            print(
                f"  context parallel: {phase.layout.context} ranks ({phase.layout.context_mode}), "
                f"{data.micro_bsz * data.seq_len // phase.layout.context:,} tokens of each micro-batch per rank "
                f"(activations / {phase.layout.context}); {format_bytes(comm.context)} sent per device per step "
                f"(tensor {format_bytes(comm.tensor)}, data {format_bytes(comm.data)})"
            )
        print(f"  time: {format_duration(seconds)} at {tgs:,.0f} tokens/device/s ({source})")
        tensor = phase.layout.tensor
        if tensor not in probes:
            probes[tensor] = measure_startup(mc, tensor, first.seed)
        probe = probes[tensor]
        seconds, params = startup_estimate(mc, phase.layout, probe), most_loaded_stage_params(mc, phase.layout)
        print(
            f"  start-up estimate: {seconds:,.1f} s per device to build its shard of the "
            f"most loaded stage ({format_count(params)} parameters) on the meta device, "
            f"materialise and initialise it; extrapolated by parameter count from a measurement here: "
            f"{probe.layers} decoder layer(s) of hidden {probe.hidden} built on meta, cut to tensor rank 0 of "
            f"{probe.tensor}, {probe.tensors} of its {probe.total_tensors} tensors ({format_count(probe.params)} "
            f"parameters) materialised and initialised in {probe.seconds:.2f} s (+ {probe.fixed_seconds:.2f} s "
            f"one-time warm-up)"
        )
    devices = f"{world_size} device{'s' if world_size != 1 else ''}"
    print(f"\ntotal: {format_count(total_tokens)} tokens in {format_duration(total_seconds)} on {devices}")


__all__ = ["print_dry_run"]
