"""One-call GPU check of the training step: eager vs fused kernels vs compiled layers, and transformers' Llama.

    python benchmarks/gpu_check.py            # one H100: ~1.1B-parameter InternLM, bf16, seq 4096 (< 8 minutes)
    python benchmarks/gpu_check.py --smoke    # a tiny model on the CPU, seconds (tests/e2e/test_benchmarks.py)

An InternLM model of about 1B parameters (hidden 2048, 14 layers, 16 heads, InternLM's 103168 vocabulary), bf16,
micro-batches of one 4096-token sequence of packed documents (mean length 1024), through our trainer's step
(`benchmarks/common.TrainerStep`: model chunks from `internlm.train.build`, the hybrid ZeRO optimizer with fp32
master weights, the loss, the schedule), one variant after the other in one process (each alone on the device,
so its peak memory is its own):

| variant | kernels (`internlm.kernels`) | head + loss | layers |
| --- | --- | --- | --- |
| eager | eager references (``kernel_backend("eager")``) | lm_head logits + cross-entropy | eager |
| fused | auto: Triton on CUDA | fused, chunked (``model.fused_loss``) | eager |
| compiled | auto (inductor fuses norm / rotary / SwiGLU itself) | fused, chunked | ``model.compile=True`` |
| transformers | ``LlamaForCausalLM``: sdpa, per-document 4D mask, bf16 weights, ``AdamW(fused=True)`` | | |

Every variant starts from the same weights (the first-step losses are printed and must agree to bf16 rounding).
Columns: tokens/s over ``--steps`` timed steps after ``--warmup`` (compilation happens there), model TFLOP/s per
device (``InternLMConfig.flops_per_token``: recomputation never counted), MFU against the device's dense bf16
peak (`internlm.planning.peak_tflops`; ``--peak-tflops`` overrides; n/a when unknown), peak memory allocated
(CUDA), and which kernel backends ran. A variant that fails prints its error and the run goes on; variants left
when ``--budget`` seconds have passed are skipped.

``--smoke``: hidden 64, 2 layers, seq 128, 1 timed step, on the CPU (fp32; the compiled variant uses dynamo's
``eager`` backend, no inductor code generation), to check the script end to end in seconds.
"""

from __future__ import annotations

import argparse
import collections
import os
import time
import traceback

import torch
from common import (
    HFStep,
    TrainerStep,
    format_table,
    fresh_memory,
    machine_load,
    packed_batch,
    peak_memory_gib,
    run_config,
    synchronize,
)

from internlm.kernels import dispatch
from internlm.model import flash_attn_available
from internlm.model.hf import to_hf_name
from internlm.planning import peak_tflops

FULL = dict(hidden=2048, layers=14, heads=16, vocab=103168, seq_len=4096, micro_bsz=1, micro_num=4, mean_doc=1024)
SMOKE = dict(hidden=64, layers=2, heads=4, vocab=512, seq_len=128, micro_bsz=1, micro_num=2, mean_doc=32)
VARIANTS = ("eager", "fused", "compiled", "transformers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU (seconds)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 8; smoke 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; smoke 1)")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS)
    )
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers")
    parser.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator (default: device table)")
    parser.add_argument("--budget", type=float, default=420.0, help="skip variants left after this many seconds")
    args = parser.parse_args()
    started = time.perf_counter()
    shape = dict(SMOKE if args.smoke else FULL)
    if args.layers:
        shape["layers"] = args.layers
    steps = args.steps or (1 if args.smoke else 8)
    warmup = args.warmup or (1 if args.smoke else 2)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if args.smoke:
        torch.set_num_threads(1)  # tiny ops: threads only add synchronisation (and stall on a loaded machine)
    dtype = "torch.float32" if device.type == "cpu" else "torch.bfloat16"
    model = dict(
        hidden_size=shape["hidden"],
        num_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        vocab_size=shape["vocab"],
        multiple_of=256 if not args.smoke else 32,
        dtype=dtype,
        attn_backend="auto",
    )
    batch_shape = (shape["seq_len"], shape["micro_bsz"], shape["micro_num"])
    batch = packed_batch(shape["vocab"], *batch_shape, shape["mean_doc"], seed=0, device=device)
    tokens = shape["seq_len"] * shape["micro_bsz"] * shape["micro_num"]
    docs = sum(len(mb["cu_seqlens_list"]) - 1 for mb in batch)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = peak_tflops(device, args.peak_tflops)
    compile_options = dict(backend="eager") if args.smoke else None

    base_run = run_config(model, *batch_shape)
    mc = base_run.model_config
    flops = mc.flops_per_token(shape["seq_len"])
    print(f"device: {name}; torch {torch.__version__}; flash-attn {'yes' if flash_attn_available() else 'no'}")
    print(f"peak: {f'{peak:g} TFLOP/s dense bf16' if peak else 'unknown (MFU n/a; --peak-tflops sets it)'}")
    print(
        f"model: hidden {mc.hidden_size}, {mc.num_layers} layers, {mc.num_attention_heads} heads, vocab "
        f"{mc.vocab_size}: {mc.num_params() / 1e9:.3f}B parameters, {mc.dtype}; "
        f"{flops / 1e9:.2f} GFLOP per token"
    )
    print(
        f"step: {shape['micro_num']} micro-batches x {shape['micro_bsz']} x {shape['seq_len']} tokens "
        f"({docs} packed documents), {warmup} warm-up + {steps} timed steps per variant"
    )
    if device.type == "cpu":
        print(f"machine: {machine_load()}")

    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in wanted if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; use {', '.join(VARIANTS)}")

    initial = None  # CPU copy of the first variant's initial weights: every variant starts from them
    rows = []
    for variant in wanted:
        if time.perf_counter() - started > args.budget:
            rows.append((variant, "skipped (time budget)", "", "", "", "", "", ""))
            continue
        step_fn = run_step = None  # drop the previous variant before this one is built and measured
        try:
            with fresh_memory(device):
                t0 = time.perf_counter()
                if variant == "transformers":
                    step_fn = HFStep(mc, device)
                    if initial is not None:
                        state = {to_hf_name(k): v for k, v in initial.items()}
                        step_fn.model.load_state_dict(state, strict=True)

                    def run_step():
                        return step_fn(batch, shape["seq_len"])

                else:
                    sets = {
                        "eager": ["model.fused_loss=False"],
                        "fused": [],
                        "compiled": [] if compile_options else ["model.compile=True"],
                    }[variant]
                    step_fn = TrainerStep(
                        run_config(model, *batch_shape, sets),
                        device,
                        kernels="eager" if variant == "eager" else "auto",
                        initial_state=initial,
                        compile_options=compile_options if variant == "compiled" else None,
                    )
                    if initial is None:
                        initial = {
                            k: v.detach().to("cpu", copy=True) for k, v in step_fn.chunks[0].state_dict().items()
                        }

                    def run_step():
                        return step_fn(batch)

                build_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                first_loss = float(run_step())
                for _ in range(warmup - 1):
                    run_step()
                synchronize(device)
                warm_s = time.perf_counter() - t0
                dispatch.CALLS.clear()
                t0 = time.perf_counter()
                for _ in range(steps):
                    run_step()
                synchronize(device)
                elapsed = time.perf_counter() - t0
                kernels = collections.Counter(backend for (_, backend), n in dispatch.CALLS.items() for _ in range(n))
                tps = tokens * steps / elapsed
                tflops = tps * flops / 1e12
                memory = peak_memory_gib(device)
                rows.append(
                    (
                        variant,
                        f"{tps:,.0f}",
                        f"{tflops:.1f}" if tflops >= 1 else f"{tflops:.4f}",
                        f"{tflops / peak:.1%}" if peak else "n/a",
                        f"{memory:.1f}" if memory is not None else "n/a",
                        f"{first_loss:.6f}",
                        f"{build_s:.0f} + {warm_s:.0f}",
                        ", ".join(f"{k} {v}" for k, v in sorted(kernels.items())) or "-",
                    )
                )
        except Exception as exc:  # report and go on: one device call must bring back every row it can
            traceback.print_exc()
            rows.append((variant, f"failed: {type(exc).__name__}: {str(exc)[:80]}", "", "", "", "", "", ""))
        finally:
            if step_fn is not None:
                step_fn.close()
    header = ("variant", "tokens/s", "TFLOP/s", "MFU", "peak GiB", "loss 1", "build + warm-up s", "kernel calls")
    print(format_table(header, rows))
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
