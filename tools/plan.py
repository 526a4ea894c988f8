"""Plan a layout: memory per device, communication, step time and MFU; or rank the layouts that fit.

    python tools/plan.py --preset internlm-7b --devices 8 --device-type h100-sxm
    python tools/plan.py --preset internlm-104b --devices 2048 --tensor 8 --pipeline 4 --chunks 2 --sp \\
        --zero1 8 --micro-bsz 1 --micro-num 32 --seq-len 4096
    python tools/plan.py --config configs/internlm_7b/phase1.py --devices 128 --device-type a100-80gb
    python tools/plan.py --preset internlm-7b --devices 8 --device-type h100-sxm --recommend

Memory comes from `internlm.train.memory` (model states, saved activations counted from the model's code, the
loss peak, micro-batches in flight per pipeline schedule; checked against CPU measurements by
tests/test_memory_model.py); bytes communicated per step from `internlm.train.costs.step_communication`.

Step time (an estimate, with these assumptions):

    compute    model FLOPs per device (``InternLMConfig.flops_per_token``, 6 N + attention, spread evenly over
               the devices) x (1 + f / 3) for a recomputed fraction f of the layers (one more forward), at
               ``--mfu-cap`` (default 50%) of the device's dense bf16 peak
    bubble     (pipeline - 1) / (chunks x micro_num) x compute (1F1B and interleaved schedules)
    tensor     tensor-parallel bytes / intra-node bandwidth (inter-node when tensor > GPUs per node): not
               overlapped, the collectives sit between the matmuls
    pipeline   pipeline bytes / the bandwidth of the link between stages (intra-node when tensor x data x
               pipeline fits a node): not overlapped
    data       zero1 reduce-scatter and parameter all-gather over the zero1 group (intra-node when tensor x
               zero1 fits a node), replica all-reduce across zero1 blocks (inter-node unless the whole
               data-parallel group fits a node); overlapped with compute (gradients with the backward, 2/3 of
               compute; the gather with the next forward, 1/3), only the excess is counted
    step       compute + bubble + tensor + pipeline + exposed data;  MFU = model FLOPs / (step x peak)

Bandwidths are effective per-GPU bus bandwidths of NCCL collectives, assumed per device type (``--intra-bw``,
``--inter-bw`` override them). A layout *fits* when its estimate is at most ``--usable`` (default 92%) of the
device memory: the rest is for what the model does not count (CUDA context, NCCL and cuBLAS workspaces,
allocator fragmentation, activation gradients in flight).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from internlm.model import PRESETS, InternLMConfig  # noqa: E402
from internlm.parallel.layout import Layout  # noqa: E402
from internlm.train.costs import dtype_bytes, step_communication  # noqa: E402
from internlm.train.memory import checkpointed_layers, peak_stage  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    memory_gib: float  # what the driver reports (nvidia-smi total)
    peak_tflops: float  # dense bf16 tensor-core peak
    intra_bw: float  # GB/s, effective per-GPU collective bandwidth inside a node
    inter_bw: float  # GB/s, effective per-GPU bandwidth across nodes
    links: str


DEVICES: Dict[str, Device] = {
    d.name: d
    for d in (
        Device("h100-sxm", 81559 / 1024, 989.0, 360.0, 40.0, "NVLink 4 (900 GB/s both ways), 400 Gb/s NIC per GPU"),
        Device("h100-pcie", 81559 / 1024, 756.0, 40.0, 20.0, "PCIe Gen5 x16, 200 Gb/s NIC per GPU"),
        Device("h200", 143771 / 1024, 989.0, 360.0, 40.0, "NVLink 4 (900 GB/s both ways), 400 Gb/s NIC per GPU"),
        Device("a100-80gb", 81920 / 1024, 312.0, 230.0, 20.0, "NVLink 3 (600 GB/s both ways), 200 Gb/s NIC per GPU"),
        Device("a100-40gb", 40960 / 1024, 312.0, 230.0, 20.0, "NVLink 3 (600 GB/s both ways), 200 Gb/s NIC per GPU"),
        Device("l40s", 46068 / 1024, 362.0, 20.0, 10.0, "PCIe Gen4 x16 (no NVLink), 100 Gb/s NIC per GPU"),
    )
}

Checkpoint = Union[bool, float]


def parse_checkpoint(text: str) -> Checkpoint:
    low = str(text).strip().lower()
    if low in ("true", "yes", "on", "1.0"):
        return True
    if low in ("false", "no", "off", "0", "0.0", "none"):
        return False
    value = float(low)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"--checkpoint: True, False or a fraction in [0, 1], got {text}")
    return value


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB"


@dataclasses.dataclass(frozen=True)
class Batch:
    micro_bsz: int
    micro_num: int
    seq_len: int


@dataclasses.dataclass
class Estimate:
    layout: Layout
    batch: Batch
    checkpoint: Checkpoint
    memory: Dict[str, float]
    pipeline_rank: int
    times: Dict[str, float]
    comm: Any

    @property
    def step(self) -> float:
        return self.times["step"]


# ---------------------------------------------------------------------------------------------- time
def _same_node(span: int, gpus_per_node: int) -> bool:
    return span <= gpus_per_node


def step_time(
    mc: InternLMConfig,
    layout: Layout,
    batch: Batch,
    checkpoint: Checkpoint,
    device: Device,
    mfu_cap: float,
    gpus_per_node: int,
    intra_bw: float,
    inter_bw: float,
) -> Tuple[Dict[str, float], Any]:
    """Seconds per step by component (see the module docstring) and the `StepCommunication`."""
    recompute = checkpointed_layers(checkpoint, mc.num_layers) / mc.num_layers
    comm = step_communication(mc, layout, batch.micro_bsz, batch.seq_len, batch.micro_num, recompute >= 1.0)
    if 0 < recompute < 1:  # step_communication knows all-or-nothing: scale the extra forward collectives
        full = step_communication(mc, layout, batch.micro_bsz, batch.seq_len, batch.micro_num, True)
        comm = dataclasses.replace(comm, tensor=comm.tensor + recompute * (full.tensor - comm.tensor))
    tokens = layout.data * batch.micro_bsz * batch.micro_num * batch.seq_len
    flops = mc.flops_per_token(batch.seq_len) * tokens / layout.world_size
    peak = device.peak_tflops * 1e12
    compute = flops * (1 + recompute / 3) / (peak * mfu_cap)
    bubble = (layout.pipeline - 1) / (layout.num_chunks * batch.micro_num) * compute if layout.pipeline > 1 else 0.0
    gb = 1e9
    tp_bw = intra_bw if _same_node(layout.tensor, gpus_per_node) else inter_bw
    pp_bw = intra_bw if _same_node(layout.tensor * layout.data * layout.pipeline, gpus_per_node) else inter_bw
    tensor = comm.tensor / (tp_bw * gb)
    pipeline = comm.pipeline / (pp_bw * gb)
    # split the data-parallel bytes by link: zero1 group (stride tensor) and the replica all-reduce
    z, r = layout.zero1, layout.data // layout.zero1
    params = comm.data_params / (dtype_bytes(mc.dtype) * (z - 1) / z) if z > 1 else 0.0
    replica = comm.data_gradients - ((z - 1) / z * 4 * params if z > 1 else 0.0)
    zero1_bw = intra_bw if _same_node(layout.tensor * z, gpus_per_node) else inter_bw
    replica_bw = intra_bw if _same_node(layout.tensor * layout.data, gpus_per_node) else inter_bw
    grads = (comm.data_gradients - replica) / (zero1_bw * gb) + (replica / (replica_bw * gb) if r > 1 else 0.0)
    gather = comm.data_params / (zero1_bw * gb)
    data_exposed = max(0.0, grads - 2 / 3 * compute) + max(0.0, gather - compute / 3)
    step = compute + bubble + tensor + pipeline + data_exposed
    times = dict(
        compute=compute,
        bubble=bubble,
        tensor=tensor,
        pipeline=pipeline,
        data=grads + gather,
        data_exposed=data_exposed,
        step=step,
        tokens_per_device_s=tokens / layout.world_size / step,
        mfu=flops / (step * peak),
    )
    return times, comm


def estimate(
    mc: InternLMConfig,
    layout: Layout,
    batch: Batch,
    checkpoint: Checkpoint,
    device: Device,
    args: argparse.Namespace,
    attn_backend: Optional[str] = None,
) -> Estimate:
    stage = peak_stage(mc, layout, batch.micro_bsz, batch.seq_len, batch.micro_num, checkpoint, attn_backend)
    times, comm = step_time(
        mc, layout, batch, checkpoint, device, args.mfu_cap, args.gpus_per_node, args.intra_bw, args.inter_bw
    )
    return Estimate(layout, batch, checkpoint, stage.as_dict(), stage.pipeline_rank, times, comm)


# ---------------------------------------------------------------------------------------------- candidates
def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(
    mc: InternLMConfig, devices: int, global_sequences: int, micro_bsz: int, seq_len: int, gpus_per_node: int
) -> List[Tuple[Layout, Batch]]:
    """Layouts of ``devices`` that keep the global batch (``global_sequences``) and ``micro_bsz``, and that
    `Layout.fit_problems` accepts."""
    out = []
    for tensor in [t for t in (1, 2, 4, 8, 16) if t <= gpus_per_node and devices % t == 0]:
        for pipeline in [p for p in _divisors(devices // tensor) if p <= mc.num_layers and p <= 64]:
            data = devices // (tensor * pipeline)
            if global_sequences % (data * micro_bsz):
                continue
            micro_num = global_sequences // (data * micro_bsz)
            zero1s = sorted({z for z in _divisors(data) if z & (z - 1) == 0} | {data})
            for chunks in (1, 2, 4) if pipeline > 1 else (1,):
                for sp in (False, True) if tensor > 1 else (False,):
                    for zero1 in zero1s:
                        layout = Layout.create(devices, tensor, pipeline, zero1, chunks, sp)
                        if not layout.fit_problems(mc, micro_bsz, seq_len, micro_num):
                            out.append((layout, Batch(micro_bsz, micro_num, seq_len)))
    return out


# ---------------------------------------------------------------------------------------------- printing
def _layout_text(layout: Layout) -> str:
    chunks = f" x{layout.num_chunks} chunks" if layout.num_chunks > 1 else ""
    return (
        f"tp{layout.tensor}{'+sp' if layout.sequence_parallel else ''} pp{layout.pipeline}{chunks} "
        f"dp{layout.data} zero1={layout.zero1}"
    )


def _ckpt_text(checkpoint: Checkpoint) -> str:
    return str(checkpoint) if isinstance(checkpoint, bool) else f"{checkpoint:g}"


def print_estimate(mc: InternLMConfig, e: Estimate, device: Device, usable: float, attn_backend: str) -> None:
    layout, batch = e.layout, e.batch
    budget = usable * device.memory_gib * 2**30
    tokens = layout.data * batch.micro_bsz * batch.micro_num * batch.seq_len
    print(f"layout: {layout.describe()}; checkpoint {_ckpt_text(e.checkpoint)}; attention backend {attn_backend}")
    print(
        f"batch: seq_len {batch.seq_len:,} x micro_bsz {batch.micro_bsz} x micro_num {batch.micro_num} x dp "
        f"{layout.data} = {layout.data * batch.micro_bsz * batch.micro_num:,} sequences, {tokens / 1e6:,.2f}M tokens "
        f"per step"
    )
    stage = peak_stage(mc, layout, batch.micro_bsz, batch.seq_len, batch.micro_num, e.checkpoint, attn_backend)
    print(f"parameters per device (pipeline rank {stage.pipeline_rank}, the most loaded): {stage.params / 1e9:,.3f}B")
    cols = [("as given", e.checkpoint), ("no checkpointing", False), ("checkpoint=True", True)]
    mems = [
        peak_stage(mc, layout, batch.micro_bsz, batch.seq_len, batch.micro_num, ck, attn_backend).as_dict()
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
    print("\ncommunication per device per step (bytes sent, ring collectives; internlm/train/costs.py):")
    print(f"  tensor   {_gb(c.tensor)}")
    print(f"  pipeline {_gb(c.pipeline)}")
    print(f"  data     {_gb(c.data)} (gradients {_gb(c.data_gradients)}, parameter gather {_gb(c.data_params)})")
    t = e.times
    print(
        f"\nstep time estimate: {t['step']:.2f} s = compute {t['compute']:.2f} + bubble {t['bubble']:.2f} + tensor "
        f"{t['tensor']:.2f} + pipeline {t['pipeline']:.2f} + exposed data {t['data_exposed']:.2f} (data total "
        f"{t['data']:.2f}, overlapped)"
    )
    print(f"  {t['tokens_per_device_s']:,.0f} tokens/device/s, MFU {t['mfu']:.1%}")
    print(
        "  assumed: matmuls at the --mfu-cap fraction of peak (a recomputed layer adds one forward), bubble "
        "(pipeline - 1) / (chunks x micro_num), tensor and pipeline transfers not overlapped, data-parallel transfers "
        "overlapped with backward (gradients) and forward (parameters); bandwidths as in the device line"
    )


def print_ranking(estimates: List[Estimate], device: Device, usable: float, top: int) -> None:
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
            f"| {i} | {_layout_text(e.layout)} | {_ckpt_text(e.checkpoint)} | {e.batch.micro_num} | "
            f"{_gib(e.memory['total'])} (fits) | {e.step:.2f} | {e.times['tokens_per_device_s']:,.0f} | "
            f"{e.times['mfu']:.1%} |"
        )
    if not fitting:
        print("no layout fits: add devices, shorten seq_len or micro_bsz, or use a larger device")


# ---------------------------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS), help="a model preset (batch defaults below)")
    src.add_argument("--config", help="an InternLM config file: model, layout and batch as configured")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (with --config)")
    p.add_argument("--devices", type=int, required=True, help="number of devices (world size)")
    p.add_argument("--device-type", choices=sorted(DEVICES), default="h100-sxm")
    p.add_argument("--tensor", type=int)
    p.add_argument("--pipeline", type=int)
    p.add_argument("--zero1", type=int, help="zero1 group size; <= 0: the whole data-parallel group")
    p.add_argument("--chunks", type=int, help="model chunks per pipeline rank (interleaved schedule)")
    p.add_argument("--sp", action=argparse.BooleanOptionalAction, default=None, help="sequence parallel")
    p.add_argument("--micro-bsz", type=int)
    p.add_argument("--micro-num", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--checkpoint", type=parse_checkpoint, help="activation checkpointing: True, False, fraction")
    p.add_argument("--attn-backend", choices=("flash", "sdpa"), help="default: the config's (auto: flash)")
    p.add_argument("--recommend", action="store_true", help="rank the layouts that fit (global batch kept)")
    p.add_argument("--top", type=int, default=10, help="rows of the --recommend ranking")
    p.add_argument("--mfu-cap", type=float, default=0.5, help="fraction of peak the matmuls reach (default 0.5)")
    p.add_argument("--usable", type=float, default=0.92, help="fraction of device memory a layout may use")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--intra-bw", type=float, help="GB/s per GPU inside a node (default: per device type)")
    p.add_argument("--inter-bw", type=float, help="GB/s per GPU across nodes (default: per device type)")
    args = p.parse_args(argv)
    device = DEVICES[args.device_type]
    args.intra_bw = args.intra_bw or device.intra_bw
    args.inter_bw = args.inter_bw or device.inter_bw

    if args.config:
        from internlm.config import load_run_config

        run = load_run_config(args.config, args.set)
        mc = run.model_config
        layout_args = dict(
            tensor=run.parallel.tensor.size,
            pipeline=run.parallel.pipeline.size,
            zero1=run.parallel.zero1.size,
            chunks=run.model.num_chunks,
            sp=run.parallel.sequence_parallel,
        )
        batch_args = dict(micro_bsz=run.data.micro_bsz, micro_num=run.data.micro_num, seq_len=run.data.seq_len)
        checkpoint: Checkpoint = run.model.checkpoint
        source = f"{args.config}"
    else:
        mc = InternLMConfig.preset(args.preset, dtype="bf16")
        layout_args = dict(tensor=1, pipeline=1, zero1=-1, chunks=1, sp=False)
        batch_args = dict(micro_bsz=1, micro_num=8, seq_len=mc.max_position_embeddings)
        checkpoint = False
        source = f"preset {args.preset} (bf16)"
    for key in layout_args:
        if getattr(args, key) is not None:
            layout_args[key] = getattr(args, key)
    for key in batch_args:
        if getattr(args, key) is not None:
            batch_args[key] = getattr(args, key)
    if args.checkpoint is not None:
        checkpoint = args.checkpoint
    attn_backend = args.attn_backend or ("flash" if mc.attn_backend == "auto" else mc.attn_backend)
    layout = Layout.create(
        args.devices,
        layout_args["tensor"],
        layout_args["pipeline"],
        layout_args["zero1"],
        layout_args["chunks"],
        layout_args["sp"],
    )
    batch = Batch(**batch_args)

    print(
        f"model: {source}: {mc.num_params() / 1e9:,.2f}B parameters (hidden {mc.hidden_size}, {mc.num_layers} "
        f"layers, {mc.num_attention_heads} heads, {mc.num_kv_attention_heads} kv heads, MLP {mc.intermediate_size}, "
        f"vocab {mc.vocab_size}, {str(mc.dtype).replace('torch.', '')})"
    )
    print(
        f"device: {args.devices} x {device.name}: {device.memory_gib:.1f} GiB, {device.peak_tflops:g} TFLOP/s dense "
        f"bf16; assumed {args.intra_bw:g} GB/s per GPU inside a node, {args.inter_bw:g} GB/s across nodes "
        f"({device.links}), {args.gpus_per_node} GPUs per node; compute at {args.mfu_cap:.0%} of peak"
    )
    problems = layout.fit_problems(mc, batch.micro_bsz, batch.seq_len, batch.micro_num)
    if problems:
        print(f"the given layout cannot run: {problems[0]}")
        if not args.recommend:
            return 2
    else:
        print()
        print_estimate(mc, estimate(mc, layout, batch, checkpoint, device, args, attn_backend), device, args.usable,
                       attn_backend)  # fmt: skip
    if args.recommend:
        global_sequences = layout.data * batch.micro_bsz * batch.micro_num
        estimates = [
            estimate(mc, cand, cand_batch, ck, device, args, attn_backend)
            for cand, cand_batch in candidate_layouts(
                mc, args.devices, global_sequences, batch.micro_bsz, batch.seq_len, args.gpus_per_node
            )
            for ck in (False, 0.5, True)
        ]
        print(
            f"\nrecommend: global batch {global_sequences} sequences x {batch.seq_len} tokens, micro_bsz "
            f"{batch.micro_bsz} kept; micro_num = global / (dp x micro_bsz)"
        )
        print_ranking(estimates, device, args.usable, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
