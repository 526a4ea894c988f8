"""Plan a layout: memory per device, communication, step time and MFU; or rank the layouts that fit.

    python tools/plan.py --preset internlm-7b --devices 8 --device-type h100-sxm
    python tools/plan.py --preset internlm-104b --devices 2048 --tensor 8 --pipeline 4 --chunks 2 --sp \\
        --zero1 8 --micro-bsz 1 --micro-num 32 --seq-len 4096
    python tools/plan.py --config configs/internlm_7b/phase1.py --devices 128 --device-type a100-80gb
    python tools/plan.py --preset internlm-7b --devices 8 --device-type h100-sxm --recommend

The numbers come from `internlm.planning`: memory (`memory`: model states, saved activations counted from the
model's code, the loss peak, micro-batches in flight in the schedules' own order; checked against CPU measurements
by tests/planning/test_memory_model.py), bytes communicated per step (`communication`), step time and MFU (`step_time`,
whose docstring lists the assumptions), candidate layouts (`candidates`) and the device table (`devices`).
``--checkpoint`` takes every ``model.checkpoint`` setting: True, False, a fraction of the layers, attn or mlp;
``--recommend`` ranks every candidate layout with each of them (`CHECKPOINT_CANDIDATES`), keeping the global batch
and micro_bsz of the config (or of the flags).

A layout *fits* when its estimate is at most ``--usable`` (default 92%) of the device memory: the rest is for what
the model does not count (CUDA context, NCCL and cuBLAS workspaces, allocator fragmentation, activation gradients
in flight).
"""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace
from typing import Optional, Sequence

from internlm.model import PRESETS, InternLMConfig
from internlm.parallel.layout import Layout
from internlm.planning import (
    CHECKPOINT_CANDIDATES,
    PLANNER_DEVICES,
    Batch,
    Checkpoint,
    Hardware,
    candidate_layouts,
    checkpoint_text,
    estimate,
    parse_checkpoint,
    planned_attn_backend,
)
from internlm.planning.report import print_estimate, print_header, print_ranking


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line of this tool (also what tools/docs_tables.py passes for each planned row)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS), help="a model preset (batch defaults below)")
    src.add_argument("--config", help="an InternLM config file: model, layout and batch as configured")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (with --config)")
    p.add_argument("--devices", type=int, required=True, help="number of devices (world size)")
    p.add_argument("--device-type", choices=sorted(PLANNER_DEVICES), default="h100-sxm")
    p.add_argument("--tensor", type=int)
    p.add_argument("--pipeline", type=int)
    p.add_argument("--zero1", type=int, help="zero1 group size; <= 0: the whole data-parallel group")
    p.add_argument("--chunks", type=int, help="model chunks per pipeline rank (interleaved schedule)")
    p.add_argument("--context", type=int, help="context-parallel size (parallel.context)")
    p.add_argument("--context-mode", choices=("ring", "a2a"), help="parallel.context_mode")
    p.add_argument("--sp", action=argparse.BooleanOptionalAction, default=None, help="sequence parallel")
    p.add_argument("--micro-bsz", type=int)
    p.add_argument("--micro-num", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument(
        "--checkpoint", type=parse_checkpoint, help="activation checkpointing: True, False, a fraction, attn or mlp"
    )
    p.add_argument(
        "--attn-backend",
        choices=("flash", "sdpa"),
        help="default: the config's (auto: flash for 16-bit models, else sdpa)",
    )
    p.add_argument("--recommend", action="store_true", help="rank the layouts that fit (global batch kept)")
    p.add_argument("--top", type=int, default=10, help="rows of the --recommend ranking")
    p.add_argument("--mfu-cap", type=float, default=0.5, help="fraction of peak the matmuls reach (default 0.5)")
    p.add_argument("--usable", type=float, default=0.92, help="fraction of device memory a layout may use")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--intra-bw", type=float, help="GB/s per GPU inside a node (default: per device type)")
    p.add_argument("--inter-bw", type=float, help="GB/s per GPU across nodes (default: per device type)")
    return p.parse_args(argv)


def plan_inputs(args: argparse.Namespace) -> SimpleNamespace:
    """What one plan is made of: model config, layout, batch, checkpoint, hardware, attention backend, fused loss
    and the source's name, from the config or preset with the flags applied (flags win)."""
    hardware = Hardware(
        PLANNER_DEVICES[args.device_type], args.mfu_cap, args.gpus_per_node, args.intra_bw or 0.0, args.inter_bw or 0.0
    )

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
            context=run.parallel.context,
            context_mode=run.parallel.context_mode,
        )
        batch_args = dict(micro_bsz=run.data.micro_bsz, micro_num=run.data.micro_num, seq_len=run.data.seq_len)
        checkpoint: Checkpoint = run.model.checkpoint
        fused_loss = run.model.fused_loss
        source = f"{args.config}"
    else:
        mc = InternLMConfig.preset(args.preset, dtype="bf16")
        layout_args = dict(tensor=1, pipeline=1, zero1=-1, chunks=1, sp=False, context=1, context_mode="ring")
        batch_args = dict(micro_bsz=1, micro_num=8, seq_len=mc.max_position_embeddings)
        checkpoint, fused_loss = False, True
        source = f"preset {args.preset} (bf16)"
    for key in layout_args:
        if getattr(args, key) is not None:
            layout_args[key] = getattr(args, key)
    for key in batch_args:
        if getattr(args, key) is not None:
            batch_args[key] = getattr(args, key)
    if args.checkpoint is not None:
        checkpoint = args.checkpoint
    attn_backend = planned_attn_backend(mc, args.attn_backend)
    layout = Layout.create(
        args.devices,
        layout_args["tensor"],
        layout_args["pipeline"],
        layout_args["zero1"],
        layout_args["chunks"],
        layout_args["sp"],
        layout_args["context"],
        layout_args["context_mode"],
    )
    batch = Batch(**batch_args)

    return SimpleNamespace(
        mc=mc,
        layout=layout,
        batch=batch,
        checkpoint=checkpoint,
        hardware=hardware,
        attn_backend=attn_backend,
        fused_loss=fused_loss,
        source=source,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    plan = plan_inputs(args)
    mc, layout, batch, checkpoint, hardware = plan.mc, plan.layout, plan.batch, plan.checkpoint, plan.hardware
    attn_backend, fused_loss, source = plan.attn_backend, plan.fused_loss, plan.source
    print_header(mc, source, args.devices, hardware)
    problems = layout.fit_problems(mc, batch.micro_bsz, batch.seq_len, batch.micro_num)
    if problems:
        print(f"the given layout cannot run: {problems[0]}")
        if not args.recommend:
            return 2
    else:
        print()
        given = estimate(mc, layout, batch, checkpoint, hardware, attn_backend, fused_loss)
        print_estimate(mc, given, hardware, args.usable, attn_backend)
    if args.recommend:
        global_sequences = layout.data * batch.micro_bsz * batch.micro_num
        estimates = [
            estimate(mc, cand, cand_batch, ck, hardware, attn_backend, fused_loss)
            for cand, cand_batch in candidate_layouts(
                mc,
                args.devices,
                global_sequences,
                batch.micro_bsz,
                batch.seq_len,
                args.gpus_per_node,
                layout.context,
                layout.context_mode,
            )
            for ck in CHECKPOINT_CANDIDATES
        ]
        print(
            f"\nrecommend: global batch {global_sequences} sequences x {batch.seq_len} tokens, micro_bsz "
            f"{batch.micro_bsz} kept; micro_num = global / (dp x micro_bsz); checkpoint "
            + ", ".join(checkpoint_text(ck) for ck in CHECKPOINT_CANDIDATES)
        )
        print_ranking(estimates, hardware, args.usable, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
