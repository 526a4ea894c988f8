"""What `tools/plan.py` prints: the model and device lines, one layout's estimate, and the ranking of layouts."""

from __future__ import annotations

from typing import Any, List

from .memory import peak_stage
from .recompute import checkpoint_text
from .step_time import Estimate, Hardware


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB"


def print_header(model_config: Any, source: str, devices: int, hardware: Hardware) -> None:
    """The model line (``source``: the preset or config it came from) and the device line with the assumptions."""
    mc, device = model_config, hardware.device
    print(
        f"model: {source}: {mc.num_params() / 1e9:,.2f}B parameters (hidden {mc.hidden_size}, {mc.num_layers} "
        f"layers, {mc.num_attention_heads} heads, {mc.num_kv_attention_heads} kv heads, MLP {mc.intermediate_size}, "
        f"vocab {mc.vocab_size}, {str(mc.dtype).replace('torch.', '')})"
    )
    print(
        f"device: {devices} x {device.name}: {device.memory_gib:.1f} GiB, {device.peak_tflops:g} TFLOP/s dense "
        f"bf16; assumed {hardware.intra:g} GB/s per GPU inside a node, {hardware.inter:g} GB/s across nodes "
        f"({device.links}), {hardware.gpus_per_node} GPUs per node; compute at {hardware.mfu_cap:.0%} of peak"
    )


def print_estimate(model_config: Any, e: Estimate, hardware: Hardware, usable: float, attn_backend: str) -> None:
    """One layout: batch, parameters, the memory table (as given, without and with full checkpointing), the
    communication per step and the step time; a layout fits below ``usable`` of the device memory."""
    mc, layout, batch, device = model_config, e.layout, e.batch, hardware.device
    budget = usable * device.memory_gib * 2**30
    tokens = layout.data * batch.micro_bsz * batch.micro_num * batch.seq_len
    print(f"layout: {layout.describe()}; checkpoint {checkpoint_text(e.checkpoint)}; attention backend {attn_backend}")
    print(
        f"batch: seq_len {batch.seq_len:,} x micro_bsz {batch.micro_bsz} x micro_num {batch.micro_num} x dp "
        f"{layout.data} = {layout.data * batch.micro_bsz * batch.micro_num:,} sequences, {tokens / 1e6:,.2f}M tokens "
        f"per step"
    )
    print(f"parameters per device (pipeline rank {e.pipeline_rank}, the most loaded): {e.params / 1e9:,.3f}B")
    cols = [("as given", e.checkpoint), ("no checkpointing", False), ("checkpoint=True", True)]
    mems = [
        peak_stage(
            mc, layout, batch.micro_bsz, batch.seq_len, batch.micro_num, ck, attn_backend, e.fused_loss
        ).as_dict()
        for _, ck in cols
    ]
    print(f"\nmemory per device (GiB; {device.name}: {device.memory_gib:.1f} GiB, fits below {usable:.0%}):")
    print("| | " + " | ".join(name for name, _ in cols) + " |")
    print("| --- |" + " ---: |" * len(cols))
    for key, label in (
        ("weights", "weights (model dtype)"),
        ("gradients", "fp32 gradient buffers"),
        ("optimizer", "optimizer shards (fp32 master + Adam m, v)"),
        ("activations", "activations in flight"),
        ("transient", "loss / recompute / backward transient"),
        ("total", "total"),
    ):
        print(f"| {label} | " + " | ".join(f"{m[key] / 2**30:,.1f}" for m in mems) + " |")
    print("| fits | " + " | ".join("yes" if m["total"] <= budget else "NO" for m in mems) + " |")
    c = e.comm
    print("\ncommunication per device per step (bytes sent, ring collectives; internlm/planning/communication.py):")
    print(f"  tensor   {_gb(c.tensor)}")
    if c.context:
        print(f"  context  {_gb(c.context)} ({layout.context_mode}: context_layer_bytes)")
    print(f"  pipeline {_gb(c.pipeline)}")
    print(f"  data     {_gb(c.data)} (gradients {_gb(c.data_gradients)}, parameter gather {_gb(c.data_params)})")
    t = e.times
    context_time = f" + context {t['context']:.2f}" if c.context else ""
    print(
        f"\nstep time estimate: {t['step']:.2f} s = compute {t['compute']:.2f} + bubble {t['bubble']:.2f} + tensor "
        f"{t['tensor']:.2f}{context_time} + pipeline {t['pipeline']:.2f} + exposed data {t['data_exposed']:.2f} "
        f"(data total {t['data']:.2f}, overlapped)"
    )
    print(f"  {t['tokens_per_device_s']:,.0f} tokens/device/s, MFU {t['mfu']:.1%}")
    print(
        "  assumed: matmuls at the --mfu-cap fraction of peak (a recomputed layer adds one forward), bubble "
        "(pipeline - 1) / (chunks x micro_num), tensor and pipeline transfers not overlapped, data-parallel transfers "
        "overlapped with backward (gradients) and forward (parameters); bandwidths as in the device line"
    )


def print_ranking(estimates: List[Estimate], hardware: Hardware, usable: float, top: int) -> None:
    """The ``top`` fastest of the ``estimates`` that fit ``usable`` of the device memory."""
    device = hardware.device
    budget = usable * device.memory_gib * 2**30
    fitting = sorted((e for e in estimates if e.memory["total"] <= budget), key=lambda e: (e.step, e.memory["total"]))
    print(
        f"\n{len(estimates)} layouts x checkpoint settings evaluated, {len(fitting)} fit {usable:.0%} of "
        f"{device.memory_gib:.1f} GiB; fastest first:"
    )
    header = ("#", "layout", "checkpoint", "micro_num", "memory/device", "step s", "tokens/dev/s", "MFU")
    print("| " + " | ".join(header) + " |")
    print("| ---: | --- | --- | ---: | --- | ---: | ---: | ---: |")
    for i, e in enumerate(fitting[:top], 1):
        print(
            f"| {i} | {e.layout.describe('compact')} | {checkpoint_text(e.checkpoint)} | {e.batch.micro_num} | "
            f"{_gib(e.memory['total'])} (fits) | {e.step:.2f} | {e.times['tokens_per_device_s']:,.0f} | "
            f"{e.times['mfu']:.1%} |"
        )
    if not fitting:
        print("no layout fits: add devices, shorten seq_len or micro_bsz, or use a larger device")


__all__ = ["print_header", "print_estimate", "print_ranking"]
