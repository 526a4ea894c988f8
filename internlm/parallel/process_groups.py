"""The process-group grid: tensor x context x data x pipeline, plus hybrid-ZeRO subgroups of the data dimension.

The grid is the one a `Layout` describes (tensor fastest, then context, then data, then pipeline)::

    rank = tp_rank + tp_size * (cp_rank + cp_size * (dp_rank + dp_size * pp_rank))

`init_parallel_context` creates the groups of every kind (`Layout.group_ranks`) collectively and returns
this process's `ParallelContext`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Optional

import torch.distributed as dist

from .layout import Layout

ProcessGroup = Any  # torch.distributed.ProcessGroup; kept loose so the dataclass pickles without torch internals


@dataclass
class ParallelContext:
    """This process's place in a `Layout`: its rank in every dimension and the groups it belongs to.

    Sizes are read from ``layout`` (``pc.tp_size == pc.layout.tensor``); the zero1 replica group has
    ``dp_size // zero1_size * cp_size`` members (`zero1_replicas`: context ranks are replicas too). Groups are
    ``None`` in a single process; every collective in `internlm.parallel` is skipped when its group is ``None`` or
    has size 1.
    ``pp_prev_rank`` / ``pp_next_rank`` are global ranks (None at the ends).
    """

    layout: Layout = field(default_factory=Layout.single)
    rank: int = 0
    tp_rank: int = 0
    tp_group: Optional[ProcessGroup] = None
    pp_rank: int = 0
    pp_group: Optional[ProcessGroup] = None
    pp_prev_rank: Optional[int] = None
    pp_next_rank: Optional[int] = None
    dp_rank: int = 0
    dp_group: Optional[ProcessGroup] = None
    zero1_rank: int = 0
    zero1_group: Optional[ProcessGroup] = None
    zero1_replica_group: Optional[ProcessGroup] = None  # same zero1 rank in every zero1 block and context rank
    cp_rank: int = 0
    cp_group: Optional[ProcessGroup] = None  # the ranks splitting one sequence (None when context == 1)

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def tp_size(self) -> int:
        return self.layout.tensor

    @property
    def pp_size(self) -> int:
        return self.layout.pipeline

    @property
    def dp_size(self) -> int:
        return self.layout.data

    @property
    def zero1_size(self) -> int:
        return self.layout.zero1

    @property
    def cp_size(self) -> int:
        return self.layout.context

    @property
    def zero1_replicas(self) -> int:
        """Ranks holding the same optimizer slice, the size of ``zero1_replica_group``: the zero1 blocks of the
        data-parallel group times the context ranks (weights are replicated across both)."""
        return self.layout.data // self.layout.zero1 * self.layout.context

    @property
    def sequence_parallel(self) -> bool:
        return self.layout.sequence_parallel

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


def init_parallel_context(layout: Layout, rank: int, timeout: Optional[timedelta] = None) -> ParallelContext:
    """Build this process's `ParallelContext` for ``layout`` (checked: raises ValueError naming the config key).

    With ``layout.world_size > 1`` torch.distributed must already be initialised; every rank then creates every
    group of every kind in the same order (``dist.new_group`` is collective over the whole world).
    """
    problems = layout.problems()
    if problems:
        raise ValueError(str(problems[0]))
    world_size = layout.world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    tp_rank, dp_rank, pp_rank = layout.coords(rank)
    cp_rank = layout.cp_rank(rank)
    pc = ParallelContext(
        layout,
        rank,
        tp_rank=tp_rank,
        pp_rank=pp_rank,
        dp_rank=dp_rank,
        zero1_rank=dp_rank % layout.zero1,
        cp_rank=cp_rank,
    )
    last = layout.pipeline - 1
    pc.pp_prev_rank = layout.rank_of(tp_rank, dp_rank, pp_rank - 1, cp_rank) if pp_rank > 0 else None
    pc.pp_next_rank = layout.rank_of(tp_rank, dp_rank, pp_rank + 1, cp_rank) if pp_rank < last else None
    if world_size == 1:
        return pc
    if not dist.is_initialized():
        raise RuntimeError(f"rank {rank}: world size {world_size} needs torch.distributed.init_process_group first")
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise RuntimeError(
            f"rank {rank}: torch.distributed reports rank {dist.get_rank()} of {dist.get_world_size()}, "
            f"but init_parallel_context was given rank {rank} of {world_size}"
        )
    options = {} if timeout is None else {"timeout": timeout}
    for kind, groups in layout.group_ranks().items():
        for ranks in groups:
            group = dist.new_group(ranks, **options)  # collective: every rank creates every group
            if rank in ranks:
                setattr(pc, f"{kind}_group", group)
    return pc


def describe_groups(pc: ParallelContext) -> str:
    """A short table of which global ranks form each group (rank 0 prints it at start-up)."""
    groups = pc.layout.group_ranks()
    if pc.cp_size > 1:
        lines = [
            f"world {pc.world_size} = tensor {pc.tp_size} x context {pc.cp_size} ({pc.layout.context_mode}) x data "
            f"{pc.dp_size} x pipeline {pc.pp_size}; zero1 {pc.zero1_size}; sequence_parallel {pc.sequence_parallel}",
            "rank = tp_rank + tp_size * (cp_rank + cp_size * (dp_rank + dp_size * pp_rank))",
        ]
    else:
        lines = [
            f"world {pc.world_size} = tensor {pc.tp_size} x data {pc.dp_size} x pipeline {pc.pp_size}; "
            f"zero1 {pc.zero1_size}; sequence_parallel {pc.sequence_parallel}",
            "rank = tp_rank + tp_size * (dp_rank + dp_size * pp_rank)",
        ]
    width = max(len(k) for k in groups if k != "zero1_replica")  # the long name does not widen the table
    for kind, lists in groups.items():
        shown = lists if len(lists) <= 8 else lists[:4] + [["..."]] + lists[-2:]
        body = " ".join("[" + ",".join(str(r) for r in ranks) + "]" for ranks in shown)
        lines.append(f"  {kind:<{width}} groups ({len(lists)}): {body}")
    return "\n".join(lines)


__all__ = ["ParallelContext", "init_parallel_context", "describe_groups"]
