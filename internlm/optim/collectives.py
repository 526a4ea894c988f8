"""The parameter all-gather of the optimizer, with its size-1 and gloo special cases.

A group is a ``torch.distributed`` process group, or ``None`` for a dimension of size 1. Nothing is issued
when the group has a single member, so a single process never needs ``torch.distributed`` to be initialised.
All-reduces go through `internlm.parallel.comm.all_reduce_`.
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch
import torch.distributed as dist

from internlm.parallel.comm import group_size


class _GatherWork:
    """Handle of a list-form all-gather: keeps the input copy alive until the gather completes."""

    def __init__(self, work: Any, keep_alive: torch.Tensor) -> None:
        self._work = work
        self._keep_alive = keep_alive

    def wait(self) -> None:
        self._work.wait()
        self._keep_alive = None


def all_gather_shards(flat: torch.Tensor, group: Any, async_op: bool = False) -> Optional[Any]:
    """Fill every slice of ``flat`` from its owner: rank z of ``group`` holds slice z.

    ``flat`` splits into ``group_size`` equal contiguous slices; before the call only this rank's slice
    is current, after it every slice is (an all-gather of ``numel / size`` elements from every rank).
    NCCL gathers in place into the flat tensor; gloo has no all_gather_into_tensor, so it uses the list
    form with the output slices as views of ``flat`` and a copy of the input (input and output alias).
    """
    size = group_size(group)
    if size == 1:
        return None
    rank = dist.get_rank(group)
    shard = flat.numel() // size
    local = flat[rank * shard : (rank + 1) * shard]
    if dist.get_backend(group) == "nccl":
        return dist.all_gather_into_tensor(flat, local, group=group, async_op=async_op)
    outputs: List[torch.Tensor] = list(flat.split(shard))
    source = local.clone()
    work = dist.all_gather(outputs, source, group=group, async_op=async_op)
    return _GatherWork(work, source) if async_op else None


__all__ = ["all_gather_shards"]
