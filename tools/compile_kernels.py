"""Compile every Triton kernel of internlm/kernels ahead of time for A100 (sm_80) and H100 (sm_90), no GPU needed.

    python tools/compile_kernels.py                    # every kernel x dtype x arch x shipped shape; the table
    python tools/compile_kernels.py --json rows.json   # the rows as JSON too
    python tools/compile_kernels.py --shapes internlm_104b/phase1 --dtypes bf16 --archs 90

Shapes: the phase files of the shipped configs (configs/internlm_7b, configs/internlm_104b: hidden size, heads and
MLP width per tensor rank, tokens per micro-batch, tokens per rank in the norms under sequence parallelism, the
vocabulary rows per rank), and each large model preset no shipped config uses, at tensor 1. Per shape, the block
sizes and warps are those the kernels' launchers pick (`internlm.kernels.aot`). Each row: registers, stack frame
and spill bytes from ptxas, shared memory from the compiled kernel against the GPU's per-block limit (A100 163 KB,
H100 227 KB). Exit status 1 when any kernel fails to compile or exceeds the limit, else 0. Nothing is cached on
disk between runs (triton's cache goes to a temporary folder, or ``--cache-dir``).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = ("internlm_7b", "internlm_104b")
LARGE_PRESETS = ("internlm-7b", "internlm-20b", "internlm-104b")
COLUMNS = (
    ("kernel", 12),
    ("variant", 20),
    ("dtype", 5),
    ("arch", 6),
    ("shape", 34),
    ("warps", 5),
    ("blocks", 26),
    ("regs", 4),
    ("stack", 5),
    ("spill st/ld", 11),
    ("shared", 7),
    ("limit", 7),
    ("status", 6),
)


def shipped_shapes(repo: str = REPO) -> List[Any]:
    """`KernelShape` s of the shipped configs' phases (deduplicated) and of the large presets they leave out."""
    from internlm.config import load_run_config
    from internlm.kernels.aot import KernelShape
    from internlm.model import InternLMConfig

    shapes: Dict[tuple, Any] = {}
    used = set()

    def add(name: str, model: Any, tp: int, sp: bool, tokens: int) -> None:
        shape = KernelShape(
            name=name,
            tokens=tokens,
            norm_tokens=tokens // tp if sp else tokens,
            hidden=model.hidden_size,
            heads=model.num_attention_heads // tp,
            kv_heads=model.num_kv_attention_heads // tp,
            head_dim=model.head_dim,
            intermediate=model.intermediate_size // tp,
            vocab_local=model.vocab_size // tp,
        )
        key = tuple(vars(shape).values())[1:]
        if key in shapes:  # phases with the same shapes share one name: "internlm_104b/phase1+phase2"
            shape = dataclasses.replace(shapes[key], name=f"{shapes[key].name}+{name.split('/')[-1]}")
        shapes[key] = shape

    for folder in SHIPPED:
        for path in sorted(glob.glob(os.path.join(repo, "configs", folder, "*.py"))):
            if os.path.basename(path) == "base.py":
                continue
            run = load_run_config(path)
            used.add(run.model.preset)
            tp = run.parallel.tensor.size
            name = f"{folder}/{os.path.basename(path)[:-3]}"
            add(name, run.model_config, tp, bool(run.parallel.sequence_parallel), run.data.seq_len * run.data.micro_bsz)
    for preset in LARGE_PRESETS:
        if preset not in used:
            model = InternLMConfig.preset(preset)
            add(f"{preset} tp1", model, 1, False, model.max_position_embeddings)
    return list(shapes.values())


def _blocks(constexprs: Dict[str, Any]) -> str:
    return ",".join(f"{k.replace('BLOCK_', '')}={int(v) if isinstance(v, bool) else v}" for k, v in constexprs.items())


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    """The rows as a fixed-width table (shared memory and the limit in bytes)."""
    lines = ["  ".join(name.ljust(width) for name, width in COLUMNS).rstrip()]
    for row in rows:
        if row["ok"] or "registers" in row:
            spill = f"{row.get('spill_stores', '-')}/{row.get('spill_loads', '-')}"
        else:
            spill = "-"
        values = (
            row["kernel"],
            row["variant"] or "-",
            row["dtype"],
            row["arch"],
            row["shape"],
            row["num_warps"],
            _blocks(row["constexprs"]),
            row.get("registers", "-"),
            row.get("stack", "-"),
            spill,
            row["shared"],
            row["shared_limit"],
            "ok" if row["ok"] else "FAIL",
        )
        lines.append("  ".join(str(v).ljust(width) for v, (_, width) in zip(values, COLUMNS)).rstrip())
        if not row["ok"]:
            lines.append(f"    error: {row['error']}")
    return "\n".join(lines)


def summary(rows: Sequence[Dict[str, Any]], seconds: float, compiled: int) -> str:
    failed = [row for row in rows if not row["ok"]]
    kernels = sorted({row["kernel"] for row in rows})
    spilling = sorted({row["kernel"] for row in rows if row.get("spill_stores", 0) or row.get("spill_loads", 0)})
    return (
        f"{len(rows)} rows ({len(kernels)} kernels: {', '.join(kernels)}), {compiled} distinct compilations, "
        f"{len(failed)} failed, max shared {max((r['shared'] for r in rows), default=0)} B, "
        f"max registers {max((r.get('registers', 0) for r in rows), default=0)}, "
        f"spilling: {', '.join(spilling) or 'none'}; {seconds:.1f} s"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--shapes", nargs="*", help="only these shape names (as printed), default all")
    parser.add_argument("--dtypes", nargs="*", choices=("bf16", "fp16", "fp32"), help="default all three")
    parser.add_argument("--archs", nargs="*", type=int, choices=(80, 90), help="default 80 and 90")
    parser.add_argument("--kernels", nargs="*", help="only these kernels (e.g. _rms_bwd), default all")
    parser.add_argument("--cache-dir", help="triton's cache folder (default: a temporary one, removed at the end)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        os.environ["TRITON_CACHE_DIR"] = args.cache_dir or scratch  # read by triton when it first compiles
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton's default today, stated to silence it
        from internlm.kernels import aot

        shapes = shipped_shapes()
        if args.shapes:
            unknown = sorted(set(args.shapes) - {s.name for s in shapes})
            if unknown:
                parser.error(f"unknown shape(s) {', '.join(unknown)}; known: {', '.join(s.name for s in shapes)}")
            shapes = [s for s in shapes if s.name in args.shapes]
        names = {v: k for k, v in aot.DTYPE_NAMES.items()}
        dtypes = [names[d] for d in args.dtypes] if args.dtypes else aot.DTYPES
        archs = [a for a in aot.ARCHS if not args.archs or a.capability in args.archs]
        start = time.perf_counter()
        rows = aot.compile_rows(shapes, dtypes, archs, kernels=args.kernels)
        seconds = time.perf_counter() - start
    distinct = len({(row["arch"], row.get("binary")) for row in rows})
    for shape in shapes:
        print(
            f"shape {shape.name}: {shape.tokens} tokens ({shape.norm_tokens} in the norms), hidden {shape.hidden}, "
            f"heads {shape.heads}/{shape.kv_heads} kv of {shape.head_dim}, MLP {shape.intermediate}, "
            f"vocab rows {shape.vocab_local} (per tensor rank)"
        )
    print(format_table(rows))
    print(summary(rows, seconds, distinct))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "seconds": seconds}, f, indent=1)
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
