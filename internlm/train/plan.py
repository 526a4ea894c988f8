"""`train.py --dry-run`: the plan of every phase, without touching a device or a process group.

Memory per device: `internlm.train.memory.memory_per_device` (the most loaded pipeline stage: weights, gradients,
optimizer state, the activations in flight at the peak and the loss or recomputation transient; see that module).

Checkpoint: whether the run's checkpoint folder holds a complete checkpoint, and where a run of the same command
would continue (`resume_plan`, also the "start" line of the training banner).

Start-up estimate (per device, before the first step): building the model chunks of the most loaded stage on
the meta device, materialising this device's tensor shard and drawing its initial values (`InternLM.init_weights`
draws only the tiles of the shard). It is extrapolated by parameter count from a measurement taken when the
plan is printed (`measure_startup`, well under a few seconds): decoder layers of the same width (as many as fit in
`_PROBE_PARAMS` parameters, at least one) built on meta and cut to tensor rank 0's piece of the phase's tensor size,
of which the tensors that fit `_PROBE_PARAMS` are materialised on the CPU and initialised; plus the one-time
warm-up of the process's first meta build.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from internlm.config import ConfigError
from internlm.model import InternLM, InternLMConfig
from internlm.parallel import TPShard

from .checkpoint_files import latest_checkpoint, read_meta
from .initial_load import start_text
from .lr_schedule import warmup_cosine_lr
from .memory import memory_per_device as memory_model
from .metrics import format_bytes, format_count, format_duration
from .phases import Phase, resume_point

# Throughput assumed when none is given or measured: 40% MFU on a 312 TFLOP/s (A100/A800-class) device,
# the hardware InternLM was trained on.
_ASSUMED_PEAK_TFLOPS = 312.0
_ASSUMED_MFU = 0.4


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
    devices = f"{layout.world_size} device{'s' if layout.world_size != 1 else ''}"
    return (
        f"{devices} = tensor {layout.tensor} x pipeline {layout.pipeline} (chunks "
        f"{layout.num_chunks}) x data {layout.data}; zero1 {layout.zero1}; sequence parallel "
        f"{layout.sequence_parallel}"
    )


def params_per_device(phase: Phase) -> float:
    """Parameters of one device of the most loaded pipeline stage: its layers and the embedding (first stage) or
    head (last), divided by the tensor size."""
    mc, layout = phase.config.model_config, phase.layout
    layers = math.ceil(mc.num_layers / layout.pipeline)
    per_layer = (
        mc.num_params(include_embedding=False) - mc.hidden_size - mc.vocab_size * mc.hidden_size
    ) / mc.num_layers
    stage_params = layers * per_layer + mc.vocab_size * mc.hidden_size  # + embedding (first) or head (last)
    return stage_params / layout.tensor


# the measurement behind the start-up estimate initialises about this many parameters (at least one tensor)
_PROBE_PARAMS = 40_000_000
# weights of row-parallel layers are split along dim 1 (their input); the other weights along dim 0
_ROW_PARALLEL = ("o_proj.weight", "down_proj.weight")


@dataclass(frozen=True)
class StartupProbe:
    """What `measure_startup` measured: ``layers`` decoder layers of width ``hidden`` built on meta and cut to
    tensor rank 0's piece of ``tensor``, of which ``tensors`` of ``total_tensors`` parameter tensors (``params``
    values) were materialised and initialised, in ``seconds``; after a one-time warm-up of ``fixed_seconds``
    (the first meta build of a process: torch's lazy set-up)."""

    fixed_seconds: float
    seconds: float
    params: int
    layers: int
    hidden: int
    tensor: int
    tensors: int
    total_tensors: int

    @property
    def seconds_per_param(self) -> float:
        return self.seconds / max(self.params, 1)


def _rank0_piece(model: InternLM, tensor: int) -> Dict[str, TPShard]:
    """Cut every parameter of a meta ``model`` to the piece tensor rank 0 of ``tensor`` holds (as
    `internlm.parallel.parallelize_model` places them: column-parallel weights and biases along dim 0,
    row-parallel weights along dim 1, k/v replicated when the kv heads do not split); returns the records."""
    kv_split = model.config.num_kv_attention_heads % tensor == 0
    shards = {}
    for module_name, module in model.named_modules():
        for attr, param in list(module.named_parameters(recurse=False)):
            name = f"{module_name}.{attr}" if module_name else attr
            if name.endswith(_ROW_PARALLEL):
                dim = 1
            elif name.endswith(("norm.weight", "o_proj.bias")):
                dim = None  # replicated
            elif ".k_proj." in name or ".v_proj." in name:
                dim = 0 if kv_split else None
            else:
                dim = 0
            split = dim is not None and tensor > 1 and param.shape[dim] % tensor == 0
            shard = TPShard.split(param.shape, dim, 0, tensor) if split else TPShard.replicated(param.shape)
            shards[name] = shard
            local = torch.empty(shard.local_shape, dtype=param.dtype, device="meta")
            setattr(module, attr, nn.Parameter(local, requires_grad=param.requires_grad))
    return shards


def measure_startup(mc: InternLMConfig, tensor: int, seed: int = 0) -> StartupProbe:
    """Time building decoder layers of ``mc``'s width on the meta device, cutting them to tensor rank 0's piece
    of ``tensor``, materialising them on the CPU and initialising them (`InternLM.init_weights`)."""
    h, f, kv = mc.hidden_size, mc.intermediate_size, mc.kv_dim
    per_layer = (2 * h * h + 2 * h * kv + 3 * h * f) / tensor
    layers = max(1, min(mc.num_layers, int(_PROBE_PARAMS // per_layer)))
    probe_config = replace(mc, num_layers=layers)
    started = time.perf_counter()
    with torch.device("meta"):  # the first build of a process pays a one-time set-up: measured apart
        InternLM(replace(mc, num_layers=1, hidden_size=2 * mc.num_attention_heads, vocab_size=8, multiple_of=2))
    fixed = time.perf_counter() - started
    started = time.perf_counter()
    with torch.device("meta"):
        model = InternLM(probe_config)
    model.embed_tokens = model.norm = model.lm_head = None  # decoder layers only
    shards = _rank0_piece(model, tensor)
    # a layer wider than the budget: materialise and initialise only its first tensors (the cost per value is
    # the same for every weight: drawing its tiles)
    kept = total = 0
    for module in model.modules():
        for attr, param in list(module.named_parameters(recurse=False)):
            total += 1
            if kept and kept + param.numel() > _PROBE_PARAMS:
                module._parameters[attr] = None
            else:
                kept += param.numel()
    model.to_empty(device="cpu")
    model.init_weights(seed, shards)
    seconds = time.perf_counter() - started
    tensors = list(model.parameters())
    return StartupProbe(fixed, seconds, sum(p.numel() for p in tensors), layers, h, tensor, len(tensors), total)


def startup_estimate(phase: Phase, probe: StartupProbe) -> float:
    """Seconds for one device of the most loaded stage to build and initialise its shard: ``probe``'s time per
    parameter times `params_per_device`, plus the one-time warm-up."""
    return probe.fixed_seconds + probe.seconds_per_param * params_per_device(phase)


def attn_backend_for_plan(mc: InternLMConfig) -> str:
    """The attention backend a GPU run would use: ``auto`` is flash-attn for 16-bit models, else sdpa."""
    if mc.attn_backend != "auto":
        return mc.attn_backend
    return "flash" if mc.dtype in (torch.float16, torch.bfloat16) else "sdpa"


def memory_per_device(phase: Phase) -> Dict[str, float]:
    """Peak bytes per device of ``phase`` (`internlm.train.memory.memory_per_device`): ``weights``, ``gradients``,
    ``optimizer``, ``activations``, ``transient``, ``total``."""
    config = phase.config
    mc = config.model_config
    data = config.data
    return memory_model(
        mc,
        phase.layout,
        data.micro_bsz,
        data.seq_len,
        data.micro_num,
        config.model.checkpoint,
        attn_backend=attn_backend_for_plan(mc),
    )


def resume_plan(phases: List[Phase]) -> Tuple[str, int]:
    """Where a run of ``phases`` starts, from the newest complete checkpoint of the run's checkpoint folder (not
    verified: a damaged one is reported and skipped when training starts): ``(text, index of the phase that runs
    first)``; the index is ``len(phases)`` when every phase is complete."""
    ckpt = phases[0].config.ckpt
    weights = start_text(ckpt)  # ckpt.load_ckpt_info / load_ckpt_folder (initial_load.py)
    if not ckpt.auto_resume:
        return f"from scratch (ckpt.auto_resume is off){weights}", 0
    latest = latest_checkpoint(ckpt.save_ckpt_folder)
    if latest is None:
        return f"from scratch (no checkpoint in {ckpt.save_ckpt_folder}){weights}", 0
    try:
        meta = read_meta(latest)
        point = resume_point(phases, meta, latest)
    except (OSError, ValueError, KeyError) as exc:
        return f"checkpoint {latest} is unreadable ({exc}); the newest readable one is used", 0
    except ConfigError as exc:
        return f"checkpoint {latest} does not match these phases: {exc}", 0
    where = f"checkpoint {latest} (step {meta['step']:,})"
    if point.phase_index >= len(phases):
        return f"{where}: all {len(phases)} phase(s) are complete, nothing to do", point.phase_index
    phase = phases[point.phase_index]
    first = meta["step"] + 1
    return (
        f"resumes from {where}: phase {phase.index + 1} {phase.name!r} step {point.phase_step + 1:,} "
        f"(global step {first:,})",
        point.phase_index,
    )


def print_plan(phases: List[Phase], throughput: Optional[float] = None) -> None:
    """Print the plan of every phase (``throughput``: tokens per device per second for the time estimates)."""
    first = phases[0].config
    world_size = phases[0].layout.world_size
    mc = first.model_config
    print(
        f"model: {format_count(mc.num_params())} parameters (hidden {mc.hidden_size}, {mc.num_layers} layers, "
        f"{mc.num_attention_heads} heads, vocab {mc.vocab_size}, {str(mc.dtype).replace('torch.', '')})"
    )
    previous_layout = _layout_line(phases[0])
    print(f"layout: {previous_layout}")
    start, _ = resume_plan(phases)
    print(f"start: {start}")
    measured = _measured_tgs(first.work_dir)
    probes: Dict[int, StartupProbe] = {}  # tensor size -> measurement (taken once per tensor size)
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
            f"{attn_backend_for_plan(mc)}, activation checkpointing {config.model.checkpoint})"
        )
        print(f"  time: {format_duration(seconds)} at {tgs:,.0f} tokens/device/s ({source})")
        tensor = phase.layout.tensor
        if tensor not in probes:
            probes[tensor] = measure_startup(mc, tensor, first.seed)
        probe = probes[tensor]
        print(
            f"  start-up estimate: {startup_estimate(phase, probe):,.1f} s per device to build its shard of the "
            f"most loaded stage ({format_count(params_per_device(phase))} parameters) on the meta device, "
            f"materialise and initialise it; extrapolated by parameter count from a measurement here: "
            f"{probe.layers} decoder layer(s) of hidden {probe.hidden} built on meta, cut to tensor rank 0 of "
            f"{probe.tensor}, {probe.tensors} of its {probe.total_tensors} tensors ({format_count(probe.params)} "
            f"parameters) materialised and initialised in {probe.seconds:.2f} s (+ {probe.fixed_seconds:.2f} s "
            f"one-time warm-up)"
        )
    devices = f"{world_size} device{'s' if world_size != 1 else ''}"
    print(f"\ntotal: {format_count(total_tokens)} tokens in {format_duration(total_seconds)} on {devices}")
