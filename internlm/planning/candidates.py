"""Candidate layouts for a device count: every tensor x pipeline x data split (with chunks, sequence parallelism
and zero1 sizes) that keeps the global batch and that `Layout.fit_problems` accepts; and the ``model.checkpoint``
settings the planner tries on each (`CHECKPOINT_CANDIDATES`: none, the selective modes, fractions, all)."""

from __future__ import annotations

from typing import Any, List, Tuple

from internlm.parallel.layout import Layout

from .recompute import Checkpoint
from .step_time import Batch

# every kind of ``model.checkpoint``, cheapest recomputation first: `tools/plan.py --recommend` ranks each layout
# with each of them, so the memory a mode saves is weighed against the forward it repeats
CHECKPOINT_CANDIDATES: Tuple[Checkpoint, ...] = (False, "attn", "mlp", 0.25, 0.5, 0.75, True)


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(
    model_config: Any,
    devices: int,
    global_sequences: int,
    micro_bsz: int,
    seq_len: int,
    gpus_per_node: int,
    context: int = 1,
    context_mode: str = "ring",
) -> List[Tuple[Layout, Batch]]:
    """Layouts of ``devices`` that keep the global batch (``global_sequences``) and ``micro_bsz`` (micro_num =
    global / (data x micro_bsz)): tensor a power of two up to a node (at most 16), pipeline a divisor up to
    min(layers, 64), chunks 1, 2, 4 with a pipeline, sequence parallel on and off with tensor > 1, zero1 each
    power-of-two divisor of data and data itself; ``context`` (parallel.context) kept as given, its ranks inside the
    node next to the tensor ranks (tensor x context at most a node)."""
    mc = model_config
    out = []
    inner = max(context, 1)
    node = max(gpus_per_node, inner)
    for tensor in [t for t in (1, 2, 4, 8, 16) if t * inner <= node and devices % (t * inner) == 0]:
        for pipeline in [p for p in _divisors(devices // (tensor * inner)) if p <= mc.num_layers and p <= 64]:
            data = devices // (tensor * pipeline * inner)
            if global_sequences % (data * micro_bsz):
                continue
            micro_num = global_sequences // (data * micro_bsz)
            zero1s = sorted({z for z in _divisors(data) if z & (z - 1) == 0} | {data})
            for chunks in (1, 2, 4) if pipeline > 1 else (1,):
                for sp in (False, True) if tensor > 1 else (False,):
                    for zero1 in zero1s:
                        layout = Layout.create(devices, tensor, pipeline, zero1, chunks, sp, context, context_mode)
                        if not layout.fit_problems(mc, micro_bsz, seq_len, micro_num):
                            out.append((layout, Batch(micro_bsz, micro_num, seq_len)))
    return out


__all__ = ["CHECKPOINT_CANDIDATES", "candidate_layouts"]
