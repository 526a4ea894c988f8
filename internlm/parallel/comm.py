"""Collectives over the tensor group and the autograd regions built from them.

A *region* is an autograd Function whose forward and backward are conjugate collectives, so that the
layers in `tensor_parallel` are plain matmuls between regions:

| region                              | forward                         | backward                         |
| ----------------------------------- | ------------------------------- | -------------------------------- |
| copy_to_tensor_region               | identity                        | all-reduce                       |
| reduce_from_tensor_region           | all-reduce                      | identity                         |
| scatter_to_sequence_region          | keep this rank's sequence chunk | all-gather along the sequence    |
| gather_from_sequence_region         | all-gather along the sequence   | reduce-scatter along the sequence|
| reduce_scatter_to_sequence_region   | reduce-scatter along sequence   | all-gather along the sequence    |

Hidden states are (B, S, H) and the sequence is dim 1 (packed micro-batches have B = 1). Every function is
the identity when the group is None or has one rank. gloo and NCCL take the same path: the tensor forms of
all-gather and reduce-scatter (`all_gather_into`, `reduce_scatter_into`), which both backends implement.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist

SEQ_DIM = 1


def group_size(group: Optional[Any]) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Optional[Any]) -> int:
    return 0 if group is None else dist.get_rank(group)


def _check_divisible(x: torch.Tensor, dim: int, size: int, what: str) -> None:
    if x.shape[dim] % size:
        raise ValueError(
            f"{what}: dim {dim} of shape {tuple(x.shape)} is not divisible by the tensor-parallel size {size}; "
            f"with sequence parallel, micro_bsz * seq_len must be a multiple of parallel.tensor"
        )


# ---------------------------------------------------------------------------------------------- collectives
def all_reduce_(
    x: torch.Tensor, group: Optional[Any], op: Any = dist.ReduceOp.SUM, async_op: bool = False
) -> Optional[Any]:
    """Reduce ``x`` in place over ``group`` (SUM unless ``op``); nothing is issued for a group of one.

    Returns the work handle when ``async_op`` and a collective was issued, else None. The one all-reduce
    helper of the package: regions, the loss, the optimizer and the trainer all call it.
    """
    if group_size(group) == 1:
        return None
    return dist.all_reduce(x, op=op, group=group, async_op=async_op)


def all_reduce(x: torch.Tensor, group: Optional[Any]) -> torch.Tensor:
    """Sum over the group into a new contiguous tensor (the input is not modified)."""
    if group_size(group) == 1:
        return x
    out = x.clone(memory_format=torch.contiguous_format)
    all_reduce_(out, group)
    return out


def _single_form(name: str, legacy: str) -> Any:
    """``dist.<name>`` (torch >= 2.13), else the older ``dist.<legacy>``; looked up at call time."""
    return getattr(dist, name, None) or getattr(dist, legacy)


def all_gather_into(out: torch.Tensor, x: torch.Tensor, group: Optional[Any], async_op: bool = False) -> Optional[Any]:
    """Gather every rank's ``x`` into the contiguous ``out`` (``size * x.numel()`` elements, rank order).

    ``x`` may be this rank's own slice of ``out`` (in place). A copy for a group of one. Returns the work
    handle when ``async_op`` and a collective was issued.
    """
    if group_size(group) == 1:
        if out.data_ptr() != x.data_ptr():
            out.view(-1).copy_(x.reshape(-1))
        return None
    return _single_form("all_gather_single", "all_gather_into_tensor")(out, x, group=group, async_op=async_op)


def reduce_scatter_into(
    out: torch.Tensor, x: torch.Tensor, group: Optional[Any], async_op: bool = False
) -> Optional[Any]:
    """Sum the contiguous ``x`` over the group and write this rank's ``x.numel() / size`` chunk into ``out``.

    ``out`` may be this rank's own chunk of ``x`` (in place). A copy for a group of one.
    """
    if group_size(group) == 1:
        if out.data_ptr() != x.data_ptr():
            out.view(-1).copy_(x.reshape(-1))
        return None
    return _single_form("reduce_scatter_single", "reduce_scatter_tensor")(out, x, group=group, async_op=async_op)


def split_along_dim(x: torch.Tensor, dim: int, group: Optional[Any]) -> torch.Tensor:
    """This rank's equal chunk of ``x`` along ``dim`` (no communication)."""
    size = group_size(group)
    if size == 1:
        return x
    _check_divisible(x, dim, size, "split")
    return x.chunk(size, dim=dim)[group_rank(group)].contiguous()


def all_gather_along_dim(x: torch.Tensor, dim: int, group: Optional[Any]) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in rank order."""
    size = group_size(group)
    if size == 1:
        return x
    # the collective gathers along dim 0 into one buffer; move the target dim there and back
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((size * moved.shape[0],) + tuple(moved.shape[1:]), dtype=x.dtype, device=x.device)
    all_gather_into(out, moved, group)
    return out.movedim(0, dim).contiguous()


def reduce_scatter_along_dim(x: torch.Tensor, dim: int, group: Optional[Any]) -> torch.Tensor:
    """Sum over the group, then keep this rank's chunk along ``dim``."""
    size = group_size(group)
    if size == 1:
        return x
    _check_divisible(x, dim, size, "reduce-scatter")
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((moved.shape[0] // size,) + tuple(moved.shape[1:]), dtype=x.dtype, device=x.device)
    reduce_scatter_into(out, moved, group)
    return out.movedim(0, dim).contiguous()


# ---------------------------------------------------------------------------------------------- regions
class _CopyToTensorRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad, ctx.group), None


class _ReduceFromTensorRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return split_along_dim(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_along_dim(grad, ctx.dim, ctx.group), None, None


class _GatherFromSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return all_gather_along_dim(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        # every rank used the whole gathered sequence: sum their gradients, keep our chunk
        return reduce_scatter_along_dim(grad, ctx.dim, ctx.group), None, None


class _ReduceScatterToSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return reduce_scatter_along_dim(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_along_dim(grad, ctx.dim, ctx.group), None, None


def copy_to_tensor_region(x: torch.Tensor, group: Optional[Any]) -> torch.Tensor:
    """Enter a tensor-parallel region with a replicated input: fwd identity, bwd all-reduce of the grad."""
    return x if group_size(group) == 1 else _CopyToTensorRegion.apply(x, group)


def reduce_from_tensor_region(x: torch.Tensor, group: Optional[Any]) -> torch.Tensor:
    """Leave a tensor-parallel region by summing partial outputs: fwd all-reduce, bwd identity."""
    return x if group_size(group) == 1 else _ReduceFromTensorRegion.apply(x, group)


def scatter_to_sequence_region(x: torch.Tensor, group: Optional[Any], dim: int = SEQ_DIM) -> torch.Tensor:
    """Replicated full sequence -> this rank's chunk: fwd split along ``dim``, bwd all-gather."""
    return x if group_size(group) == 1 else _ScatterToSequenceRegion.apply(x, group, dim)


def gather_from_sequence_region(x: torch.Tensor, group: Optional[Any], dim: int = SEQ_DIM) -> torch.Tensor:
    """Sequence chunk -> full sequence: fwd all-gather along ``dim``, bwd reduce-scatter."""
    return x if group_size(group) == 1 else _GatherFromSequenceRegion.apply(x, group, dim)


def reduce_scatter_to_sequence_region(x: torch.Tensor, group: Optional[Any], dim: int = SEQ_DIM) -> torch.Tensor:
    """Partial sums over the full sequence -> summed chunk: fwd reduce-scatter along ``dim``, bwd all-gather."""
    return x if group_size(group) == 1 else _ReduceScatterToSequenceRegion.apply(x, group, dim)


# ------------------------------------------------------------ the default group (checkpoint saves, health checks)
def default_group_rank() -> Tuple[int, int]:
    """``(rank, world size)`` in the default group; ``(0, 1)`` when no process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def default_group_barrier() -> None:
    """A barrier over the default group (nothing with one process)."""
    if default_group_rank()[1] > 1:
        dist.barrier()


def default_group_all_gather(obj: Any) -> List[Any]:
    """``obj`` of every rank, in rank order (the default group; its timeout applies)."""
    world = default_group_rank()[1]
    if world == 1:
        return [obj]
    out: List[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


__all__ = [
    "default_group_all_gather",
    "default_group_barrier",
    "default_group_rank",
    "SEQ_DIM",
    "group_size",
    "group_rank",
    "all_reduce_",
    "all_reduce",
    "all_gather_into",
    "reduce_scatter_into",
    "split_along_dim",
    "all_gather_along_dim",
    "reduce_scatter_along_dim",
    "copy_to_tensor_region",
    "reduce_from_tensor_region",
    "scatter_to_sequence_region",
    "gather_from_sequence_region",
    "reduce_scatter_to_sequence_region",
]
