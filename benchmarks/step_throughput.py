"""Training-step throughput of one InternLM model on this machine, with ratios against a reference run.

    python benchmarks/step_throughput.py                     # CPU: demo-sized model
    python benchmarks/step_throughput.py --preset internlm-7b --layers 4 --seq-len 4096 --dtype bf16   # a GPU

Runs forward + backward + AdamW steps for each variant in the same process and prints tokens/s, TFLOP/s
(model FLOPs from `InternLMConfig.flops_per_token`, recomputation not counted) and the ratio to the first
variant (sdpa attention, no activation checkpointing).
"""

from __future__ import annotations

import argparse
import time

import torch

from internlm.model import InternLM, InternLMConfig
from internlm.train.activation_checkpoint import apply_activation_checkpointing


def measure(
    config: InternLMConfig, backend: str, checkpoint: bool, batch: int, seq_len: int, steps: int, device: torch.device
) -> float:
    config = InternLMConfig(**{**config.__dict__, "attn_backend": backend})
    with torch.device(device):
        model = InternLM(config)
    apply_activation_checkpointing(model, checkpoint)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-4, foreach=device.type != "cuda", fused=device.type == "cuda"
    )
    ids = torch.randint(0, config.vocab_size, (batch, seq_len + 1), device=device)
    x, y = ids[:, :-1], ids[:, 1:]

    def step():
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * seq_len * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="internlm-small")
    parser.add_argument("--layers", type=int, default=None, help="override num_layers")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="fp32")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    overrides = dict(dtype=args.dtype, max_position_embeddings=args.seq_len)
    if args.layers:
        overrides["num_layers"] = args.layers
    config = InternLMConfig.preset(args.preset, **overrides)
    flops = config.flops_per_token(args.seq_len)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(
        f"{args.preset} ({config.num_params() / 1e6:.1f}M params), batch {args.batch} x {args.seq_len}, "
        f"{args.dtype}, on {name}"
    )
    variants = [("sdpa", False), ("sdpa", True), ("reference", False)]
    from internlm.model import flash_attn_available

    if flash_attn_available() and device.type == "cuda":
        variants.insert(1, ("flash", False))
    base = None
    print(f"{'attention':<10} {'recompute':<9} {'tokens/s':>12} {'TFLOP/s':>9} {'ratio':>7}")
    for backend, checkpoint in variants:
        tps = measure(config, backend, checkpoint, args.batch, args.seq_len, args.steps, device)
        base = base or tps
        print(f"{backend:<10} {str(checkpoint):<9} {tps:>12,.0f} {tps * flops / 1e12:>9.3f} {tps / base:>7.2f}")


if __name__ == "__main__":
    main()
