"""Training step on the CPU, fp32: our trainer's step against transformers' LlamaForCausalLM + torch AdamW.

    pip install transformers
    python benchmarks/cpu_vs_hf.py                      # ~22M parameters, 2 x 512 tokens of packed documents
    python benchmarks/cpu_vs_hf.py --rounds 8 --threads 2

Variants, all built first and then run alternately in one process (round after round, one step of each in a
rotating order, so that a change of machine load hits all of them alike):

* ``ours eager``: our trainer's step (`benchmarks/common.TrainerStep`: model chunks, hybrid ZeRO optimizer, loss,
  schedule, as `internlm.train.trainer` runs them) with the kernels' eager references, lm_head logits and the
  cross-entropy (``model.fused_loss=False``), no compilation;
* ``ours fused``: the default path: fused kernels (on the CPU their eager fallback), the fused chunked head + loss;
* ``ours compiled``: the default path with ``model.compile=True`` (inductor compiles every decoder layer);
* ``transformers``: ``LlamaForCausalLM`` (sdpa attention) of the same shape and initial weights, with the
  equivalent per-document 4D causal mask and positions, ``F.cross_entropy`` of fp32 logits, ``torch.optim.AdamW``
  (foreach).

Every variant starts from the same weights: the first-step losses are printed and must agree. Throughput is the
median step time over the rounds after ``--warmup`` steps (compilation happens there). Ratios are against
transformers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import HFStep, TrainerStep, format_table, machine_load, packed_batch, run_config

from internlm.model.hf import to_hf_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-bsz", type=int, default=2)
    parser.add_argument("--micro-num", type=int, default=1)
    parser.add_argument("--mean-doc", type=int, default=128, help="mean document length of the packed data")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    model = dict(
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_attention_heads=args.heads,
        vocab_size=args.vocab,
        multiple_of=256,
        dtype="torch.float32",
        attn_backend="sdpa",
    )
    shape = (args.seq_len, args.micro_bsz, args.micro_num)
    batch = packed_batch(args.vocab, *shape, args.mean_doc, seed=0, device=device)
    tokens = args.seq_len * args.micro_bsz * args.micro_num
    docs = sum(len(mb["cu_seqlens_list"]) - 1 for mb in batch)

    variants = {
        "ours eager": TrainerStep(run_config(model, *shape, ["model.fused_loss=False"]), device, kernels="eager"),
        "ours fused": TrainerStep(run_config(model, *shape), device),
    }
    if not args.skip_compile:
        variants["ours compiled"] = TrainerStep(run_config(model, *shape, ["model.compile=True"]), device)
    reference = variants["ours eager"]
    hf = HFStep(reference.run.model_config, device)
    state = {to_hf_name(k): v for k, v in reference.chunks[0].state_dict().items()}
    hf.model.load_state_dict(state, strict=True)
    variants["transformers"] = hf
    mc = reference.run.model_config
    flops = mc.flops_per_token(args.seq_len)
    print(
        f"model: hidden {mc.hidden_size}, {mc.num_layers} layers, {mc.num_attention_heads} heads, vocab "
        f"{mc.vocab_size}: {mc.num_params() / 1e6:.1f}M parameters (transformers: {hf.num_params() / 1e6:.1f}M), fp32"
    )
    print(f"batch: {args.micro_num} x {args.micro_bsz} x {args.seq_len} tokens, {docs} packed documents")
    print(f"machine: {machine_load()} (before)")

    def step(name):
        return variants[name](batch, args.seq_len) if name == "transformers" else variants[name](batch)

    first = {}
    for name in variants:  # warm-up (and compilation); all start from the same weights
        start = time.perf_counter()
        first[name] = float(step(name))
        for _ in range(args.warmup - 1):
            step(name)
        print(f"  warm-up {name}: {time.perf_counter() - start:.1f} s, first-step loss {first[name]:.6f}")

    times = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - start)
    print(f"machine: {machine_load()} (after)")
    hf_tps = tokens / statistics.median(times["transformers"])
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        tps = tokens / median
        rows.append(
            (
                name,
                f"{median * 1e3:,.0f}",
                f"{min(values) * 1e3:,.0f}",
                f"{tps:,.0f}",
                f"{tps * flops / 1e12:.3f}",
                f"{tps / hf_tps:.2f}x",
            )
        )
    header = ("variant", "median ms/step", "best ms/step", "tokens/s", "TFLOP/s", "vs transformers")
    print(format_table(header, rows))
    best = max((n for n in times if n != "transformers"), key=lambda n: statistics.median(times[n]) * -1)
    print(
        f"best of ours: {best}, {tokens / statistics.median(times[best]) / hf_tps:.2f}x transformers "
        f"({args.rounds} alternated rounds, median step time)"
    )
    for step_fn in variants.values():
        step_fn.close()


if __name__ == "__main__":
    main()
