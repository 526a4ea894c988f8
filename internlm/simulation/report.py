"""What `train.py --simulate` prints and writes: per rank, simulated beside predicted.

The relative difference is ``simulated / predicted - 1``; `TOLERANCE` is what the suite holds the planner to
(bytes per dimension 5%, peak memory 10%).
"""

from __future__ import annotations

import json
from typing import Any, Dict, List

from .rank_step import RankResult, ops_by_kind
from .recorder import DIMENSIONS

TOLERANCE = {"bytes": 0.05, "memory": 0.10}


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB"


def _diff(sim: float, model: float) -> str:
    if model == 0:
        return "  exact" if sim == 0 else "    n/a"
    return f"{100 * (sim / model - 1):+6.2f}%"


def rank_table(result: RankResult) -> str:
    """The lines printed for one rank."""
    c = result.coords
    p = result.prediction
    context = f"context {c['context']}, " if "context" in c else ""
    lines = [
        f"rank {result.rank} (tensor {c['tensor']}, {context}data {c['data']}, pipeline {c['pipeline']}) of "
        f"{result.layout}: groups and model built in {result.build_seconds:.2f} s, steady step simulated in "
        f"{result.step_seconds:.2f} s, {result.num_ops} operations",
        f"  {'per step':<22} {'simulated':>14} {'predicted':>14} {'diff':>8}",
    ]
    for dim in DIMENSIONS:
        if dim == "context" and not (p.bytes[dim] or result.bytes.get(dim)):
            continue  # no context parallelism: the line says nothing
        lines.append(
            f"  {dim + ' bytes':<22} {_gb(result.bytes.get(dim, 0.0)):>14} {_gb(p.bytes[dim]):>14} "
            f"{_diff(result.bytes.get(dim, 0.0), p.bytes[dim]):>8}"
        )
    if result.bytes.get("world"):
        lines.append(f"  {'world group bytes':<22} {_gb(result.bytes['world']):>14}")
    lines.append(
        f"  {'peak memory':<22} {_gb(result.peak_memory_bytes):>14} {_gb(p.peak_memory_bytes):>14} "
        f"{_diff(result.peak_memory_bytes, p.peak_memory_bytes):>8}"
    )
    lines.append(
        f"  {'checkpoint written':<22} {_gb(result.checkpoint_bytes):>14} {_gb(p.checkpoint_bytes):>14} "
        f"{_diff(result.checkpoint_bytes, p.checkpoint_bytes):>8}"
    )
    kinds = ", ".join(f"{k} x{n}" for k, n in sorted(ops_by_kind(result.ops).items()))
    lines.append(f"  operations (kind/group size): {kinds}")
    return "\n".join(lines)


def disagreements(result: RankResult) -> List[str]:
    """Where the simulation and the planner differ beyond `TOLERANCE`."""
    out = []
    for dim in DIMENSIONS:
        sim, model = result.bytes.get(dim, 0.0), result.prediction.bytes[dim]
        if abs(sim - model) > TOLERANCE["bytes"] * max(model, 1.0):
            out.append(f"rank {result.rank}: {dim} bytes {sim:.0f} simulated vs {model:.0f} predicted")
    sim, model = result.peak_memory_bytes, result.prediction.peak_memory_bytes
    if abs(sim - model) > TOLERANCE["memory"] * model:
        out.append(f"rank {result.rank}: peak memory {sim:.0f} simulated vs {model:.0f} predicted")
    return out


def report_dict(world_size: int, results: List[RankResult]) -> Dict[str, Any]:
    return {"world_size": world_size, "ranks": [r.to_dict() for r in results]}


def write_report(path: str, world_size: int, results: List[RankResult]) -> None:
    with open(path, "w") as f:
        json.dump(report_dict(world_size, results), f, indent=1)
        f.write("\n")


__all__ = ["TOLERANCE", "rank_table", "disagreements", "report_dict", "write_report"]
