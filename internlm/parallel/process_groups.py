"""The process-group grid: tensor x data x pipeline, plus hybrid-ZeRO subgroups of the data dimension.

Rank layout (tensor fastest, then data, then pipeline)::

    rank = tp_rank + tp_size * (dp_rank + dp_size * pp_rank)

Tensor-parallel ranks are neighbours, so a tensor group stays inside one node (its collectives run on
every layer). Pipeline stages are the slowest dimension: their point-to-point traffic is small.
ZeRO-1 groups are consecutive blocks of ``zero1_size`` data-parallel ranks: optimizer states are sharded
inside a block, while gradients are still reduced over the whole data-parallel group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch.distributed as dist

from internlm.config.access import section_get

ProcessGroup = Any  # torch.distributed.ProcessGroup; kept loose so the dataclass pickles without torch internals


@dataclass
class ParallelContext:
    """Sizes, ranks and groups of every parallel dimension seen from one process.

    Groups are ``None`` in a single process; every collective in `internlm.parallel` is skipped when its
    group is ``None`` or has size 1. ``pp_prev_rank`` / ``pp_next_rank`` are global ranks (None at the ends).
    """

    world_size: int = 1
    rank: int = 0
    tp_size: int = 1
    tp_rank: int = 0
    tp_group: Optional[ProcessGroup] = None
    pp_size: int = 1
    pp_rank: int = 0
    pp_group: Optional[ProcessGroup] = None
    pp_prev_rank: Optional[int] = None
    pp_next_rank: Optional[int] = None
    dp_size: int = 1
    dp_rank: int = 0
    dp_group: Optional[ProcessGroup] = None
    zero1_size: int = 1
    zero1_rank: int = 0
    zero1_group: Optional[ProcessGroup] = None
    sequence_parallel: bool = False

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @classmethod
    def single(cls) -> "ParallelContext":
        """One process: every size 1, every group None."""
        return cls()

    def global_rank(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        """Global rank of the process at grid coordinates (tp_rank, dp_rank, pp_rank)."""
        return tp_rank + self.tp_size * (dp_rank + self.dp_size * pp_rank)


# ---------------------------------------------------------------------------------------------- config
def config_value(cfg: Any, key: str, default: Any = None) -> Any:
    return section_get(cfg, key, default)


def config_size(value: Any, default: int) -> int:
    """``tensor=4`` and ``tensor=dict(size=4)`` both mean 4; absent means ``default``."""
    if value is None:
        return default
    if isinstance(value, bool):
        raise ValueError(f"expected an int or dict(size=...), got {value!r}")
    if isinstance(value, int):
        return value
    return int(config_value(value, "size", default))


def parse_parallel_sizes(parallel_cfg: Any, world_size: int) -> Dict[str, Any]:
    """Resolve the ``parallel`` config into sizes: tp, pp, dp, zero1 and sequence_parallel.

    Raises ValueError naming the key when the sizes do not tile ``world_size``.
    """
    parallel_cfg = parallel_cfg if parallel_cfg is not None else {}
    tp = config_size(config_value(parallel_cfg, "tensor"), 1)
    pp = config_size(config_value(parallel_cfg, "pipeline"), 1)
    if tp < 1 or pp < 1:
        raise ValueError(f"parallel.tensor / parallel.pipeline: sizes must be >= 1, got tensor={tp}, pipeline={pp}")
    if world_size % (tp * pp):
        raise ValueError(
            f"parallel: world size {world_size} is not a multiple of tensor ({tp}) * pipeline ({pp}); "
            f"launch a multiple of {tp * pp} processes or change parallel.tensor / parallel.pipeline"
        )
    dp = world_size // (tp * pp)
    zero1 = config_size(config_value(parallel_cfg, "zero1"), -1)
    if zero1 <= 0:
        zero1 = dp
    if dp % zero1:
        raise ValueError(
            f"parallel.zero1: size {zero1} does not divide the data-parallel size {dp} "
            f"(world {world_size} / tensor {tp} / pipeline {pp}); use a divisor of {dp} or -1 for all of it"
        )
    sequence_parallel = bool(config_value(parallel_cfg, "sequence_parallel", False))
    return dict(tp=tp, pp=pp, dp=dp, zero1=zero1, sequence_parallel=sequence_parallel)


# ---------------------------------------------------------------------------------------------- grid
def group_ranks(world_size: int, tp: int, pp: int, zero1: int) -> Dict[str, List[List[int]]]:
    """Global ranks of every group of each kind, in creation order (no process group needed).

    ``tp``: ranks sharing (dp, pp); ``dp``: ranks sharing (tp, pp); ``pp``: ranks sharing (tp, dp), ordered
    by stage; ``zero1``: consecutive blocks of ``zero1`` data-parallel ranks inside each dp group.
    """
    dp = world_size // (tp * pp)

    def rank(t: int, d: int, p: int) -> int:
        return t + tp * (d + dp * p)

    out: Dict[str, List[List[int]]] = {
        "tp": [[rank(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)],
        "dp": [[rank(t, d, p) for d in range(dp)] for p in range(pp) for t in range(tp)],
        "pp": [[rank(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp)],
    }
    out["zero1"] = [dp_ranks[b : b + zero1] for dp_ranks in out["dp"] for b in range(0, dp, zero1)]
    return out


def init_parallel_context(parallel_cfg: Any, world_size: int, rank: int) -> ParallelContext:
    """Build this process's `ParallelContext`.

    With ``world_size > 1`` torch.distributed must already be initialised; every rank then creates every
    group of every kind in the same order (``dist.new_group`` is collective over the whole world).
    """
    sizes = parse_parallel_sizes(parallel_cfg, world_size)
    tp, pp, dp, zero1 = sizes["tp"], sizes["pp"], sizes["dp"], sizes["zero1"]
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    tp_rank, dp_rank, pp_rank = rank % tp, (rank // tp) % dp, rank // (tp * dp)
    pc = ParallelContext(
        world_size=world_size, rank=rank,
        tp_size=tp, tp_rank=tp_rank,
        pp_size=pp, pp_rank=pp_rank,
        dp_size=dp, dp_rank=dp_rank,
        zero1_size=zero1, zero1_rank=dp_rank % zero1,
        sequence_parallel=sizes["sequence_parallel"],
    )
    pc.pp_prev_rank = pc.global_rank(tp_rank, dp_rank, pp_rank - 1) if pp_rank > 0 else None
    pc.pp_next_rank = pc.global_rank(tp_rank, dp_rank, pp_rank + 1) if pp_rank < pp - 1 else None
    if world_size == 1:
        return pc
    if not dist.is_initialized():
        raise RuntimeError(f"rank {rank}: world size {world_size} needs torch.distributed.init_process_group first")
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise RuntimeError(
            f"rank {rank}: torch.distributed reports rank {dist.get_rank()} of {dist.get_world_size()}, "
            f"but init_parallel_context was given rank {rank} of {world_size}"
        )
    for kind, groups in group_ranks(world_size, tp, pp, zero1).items():
        for ranks in groups:
            group = dist.new_group(ranks)  # collective: every rank creates every group
            if rank in ranks:
                setattr(pc, f"{kind}_group", group)
    return pc


def describe_layout(pc: ParallelContext) -> str:
    """A short table of which global ranks form each group (rank 0 prints it at start-up)."""
    groups = group_ranks(pc.world_size, pc.tp_size, pc.pp_size, pc.zero1_size)
    lines = [
        f"world {pc.world_size} = tensor {pc.tp_size} x data {pc.dp_size} x pipeline {pc.pp_size}; "
        f"zero1 {pc.zero1_size}; sequence_parallel {pc.sequence_parallel}",
        "rank = tp_rank + tp_size * (dp_rank + dp_size * pp_rank)",
    ]
    width = max(len(k) for k in groups)
    for kind, lists in groups.items():
        shown = lists if len(lists) <= 8 else lists[:4] + [["..."]] + lists[-2:]
        body = " ".join("[" + ",".join(str(r) for r in ranks) + "]" for ranks in shown)
        lines.append(f"  {kind:<{width}} groups ({len(lists)}): {body}")
    return "\n".join(lines)


__all__ = [
    "ParallelContext",
    "init_parallel_context",
    "parse_parallel_sizes",
    "group_ranks",
    "describe_layout",
    "config_value",
    "config_size",
]
