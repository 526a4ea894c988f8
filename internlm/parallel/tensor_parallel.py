"""Megatron-style tensor-parallel layers (with optional sequence parallelism).

Shapes below use T for the group size, H for hidden, S for the sequence (dim 1 of (B, S, H)).

* `ColumnParallelLinear`: ``weight`` (out/T, in) is rows chunk ``rank`` of the full (out, in) weight, bias
  likewise. Input replicated (B, S, in) enters through the copy region (bwd all-reduce); under sequence
  parallel the input is (B, S/T, in) and is all-gathered along S (bwd reduce-scatter). Output (B, S, out/T)
  stays split.
* `RowParallelLinear`: ``weight`` (out, in/T) is column chunk ``rank``; the input is already split along its
  last dim. Partial outputs (B, S, out) are all-reduced, or reduce-scattered along S to (B, S/T, out) under
  sequence parallel. The bias is replicated and added once, after the reduction.
* `VocabParallelEmbedding`: ``weight`` (V/T, H) holds vocab rows [rank*V/T, (rank+1)*V/T); ids outside
  give zero rows; the partial lookups are all-reduced (or reduce-scattered along S).
* `ReplicatedKVLinear`: grouped-query k/v projection when the kv heads cannot be split over T ranks
  (T % kv_heads == 0): every rank holds the full weight and emits only the rows of the kv heads its query
  heads read, so its weight gradient is partial (summed over the tensor group by the optimizer).
* `TensorParallelRMSNorm`: a marked RMSNorm; before attention and MLP its output enters the tensor region
  once for every projection that reads it (q/k/v, gate/up), instead of one copy / gather per projection.

Parameter attributes (see docs/architecture.md): ``_tp_shard = (dim, rank, size)``, ``_tp_duplicate``,
``_tp_partial_grad``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from internlm.model import RMSNorm

from .comm import (
    copy_to_tensor_region,
    gather_from_sequence_region,
    group_rank,
    group_size,
    reduce_from_tensor_region,
    reduce_scatter_to_sequence_region,
)


def mark_shard(param: nn.Parameter, dim: int, rank: int, size: int) -> nn.Parameter:
    param._tp_shard = (dim, rank, size)
    return param


def mark_duplicate(param: nn.Parameter, partial_grad: bool = False) -> nn.Parameter:
    """Same values on every tensor rank; with ``partial_grad`` each rank's gradient is only a part of it."""
    param._tp_duplicate = True
    if partial_grad:
        param._tp_partial_grad = True
    return param


def shard_param(full: torch.Tensor, dim: int, rank: int, size: int) -> nn.Parameter:
    """Chunk ``rank`` of ``size`` of ``full`` along ``dim`` as a new parameter (meta stays meta)."""
    if full.shape[dim] % size:
        raise ValueError(f"cannot split dim {dim} of shape {tuple(full.shape)} over {size} tensor ranks")
    if full.is_meta:
        shape = list(full.shape)
        shape[dim] //= size
        data = torch.empty(shape, dtype=full.dtype, device="meta")
    else:
        data = full.detach().chunk(size, dim=dim)[rank].clone()
    return mark_shard(nn.Parameter(data, requires_grad=full.requires_grad), dim, rank, size)


def enter_region(x: torch.Tensor, group: Optional[Any], sequence_parallel: bool) -> torch.Tensor:
    """Make a replicated (or sequence-sharded) input usable by split-output layers."""
    if sequence_parallel:
        return gather_from_sequence_region(x, group)
    return copy_to_tensor_region(x, group)


_MARKS = ("_tp_shard", "_tp_duplicate", "_tp_partial_grad")


class KeepParamMarks:
    """Mixin for modules whose parameters carry ``_tp_*`` marks.

    ``nn.Module._apply`` may swap in a new Parameter object (``to_empty`` from meta to a real device does),
    which would drop the marks that ``init_weights`` and the optimizer read; put them back afterwards.
    """

    def _apply(self, fn, recurse=True):
        marks = {
            name: {a: getattr(p, a) for a in _MARKS if hasattr(p, a)}
            for name, p in self._parameters.items() if p is not None
        }
        out = super()._apply(fn, recurse)
        for name, attrs in marks.items():
            for attr, value in attrs.items():
                setattr(self._parameters[name], attr, value)
        return out


def _empty(shape: tuple, device: Any, dtype: Optional[torch.dtype]) -> nn.Parameter:
    # values come from InternLM.init_weights (which honours _tp_shard) or from `from_linear`
    return nn.Parameter(torch.empty(shape, device=device, dtype=dtype))


class ColumnParallelLinear(KeepParamMarks, nn.Module):
    """y[..., out/T] = x @ W_rank^T + b_rank; see the module docstring for the communication.

    ``input_region=False`` skips the input copy/gather because the caller (a `TensorParallelRMSNorm`) already did it
    once for several layers sharing the same input.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, group: Optional[Any],
        sequence_parallel: bool = False, input_region: bool = True,
        device: Any = None, dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.group, self.sequence_parallel, self.input_region = group, sequence_parallel, input_region
        size, rank = group_size(group), group_rank(group)
        if out_features % size:
            raise ValueError(f"ColumnParallelLinear: out_features {out_features} not divisible by tensor size {size}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = mark_shard(_empty((out_features // size, in_features), device, dtype), 0, rank, size)
        self.bias = mark_shard(_empty((out_features // size,), device, dtype), 0, rank, size) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: Optional[Any], sequence_parallel: bool = False,
                    input_region: bool = True) -> "ColumnParallelLinear":
        """Shard an existing (possibly meta) nn.Linear: keep rows chunk ``rank`` of its weight and bias."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.group, layer.sequence_parallel, layer.input_region = group, sequence_parallel, input_region
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        size, rank = group_size(group), group_rank(group)
        layer.weight = shard_param(linear.weight, 0, rank, size)
        layer.bias = shard_param(linear.bias, 0, rank, size) if linear.bias is not None else None
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_region:
            x = enter_region(x, self.group, self.sequence_parallel)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features} (local {self.weight.shape[0]}), "
                f"sequence_parallel={self.sequence_parallel}, input_region={self.input_region}")


class RowParallelLinear(KeepParamMarks, nn.Module):
    """y = reduce_T(x_rank @ W_rank^T) + b, with x already split along its last dim.

    Under sequence parallel the bias is added to this rank's sequence chunk only, so its gradient is
    partial: it is marked ``_tp_partial_grad`` as well as ``_tp_duplicate``.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, group: Optional[Any],
        sequence_parallel: bool = False, device: Any = None, dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        size, rank = group_size(group), group_rank(group)
        if in_features % size:
            raise ValueError(f"RowParallelLinear: in_features {in_features} not divisible by tensor size {size}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = mark_shard(_empty((out_features, in_features // size), device, dtype), 1, rank, size)
        self.bias = mark_duplicate(_empty((out_features,), device, dtype), sequence_parallel) if bias else None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, group: Optional[Any], sequence_parallel: bool = False
    ) -> "RowParallelLinear":
        """Shard an existing (possibly meta) nn.Linear: keep column chunk ``rank``; the bias is reused."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.group, layer.sequence_parallel = group, sequence_parallel
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = shard_param(linear.weight, 1, group_rank(group), group_size(group))
        layer.bias = mark_duplicate(linear.bias, sequence_parallel) if linear.bias is not None else None
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x, self.weight)  # (B, S, out): this rank's share of the sum over in-features
        if self.sequence_parallel:
            out = reduce_scatter_to_sequence_region(partial, self.group)
        else:
            out = reduce_from_tensor_region(partial, self.group)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (f"in={self.in_features} (local {self.weight.shape[1]}), out={self.out_features}, "
                f"sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(KeepParamMarks, nn.Module):
    """Embedding whose vocab rows are split over the tensor group (ids outside this rank's range -> 0)."""

    def __init__(
        self, num_embeddings: int, embedding_dim: int, group: Optional[Any], sequence_parallel: bool = False,
        device: Any = None, dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        size, rank = group_size(group), group_rank(group)
        if num_embeddings % size:
            raise ValueError(f"VocabParallelEmbedding: vocab {num_embeddings} not divisible by tensor size {size}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = mark_shard(_empty((num_embeddings // size, embedding_dim), device, dtype), 0, rank, size)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, group: Optional[Any], sequence_parallel: bool = False
                       ) -> "VocabParallelEmbedding":
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.group, layer.sequence_parallel = group, sequence_parallel
        layer.num_embeddings, layer.embedding_dim = emb.num_embeddings, emb.embedding_dim
        layer.weight = shard_param(emb.weight, 0, group_rank(group), group_size(group))
        return layer

    @property
    def vocab_start(self) -> int:
        return group_rank(self.group) * self.weight.shape[0]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        # look up a valid row for foreign ids, then zero it (masked_fill also zeroes that row's gradient)
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_region(out, self.group)
        return reduce_from_tensor_region(out, self.group)

    def extra_repr(self) -> str:
        return f"vocab={self.num_embeddings} (local {self.weight.shape[0]}), dim={self.embedding_dim}"


class ReplicatedKVLinear(KeepParamMarks, nn.Module):
    """k or v projection for grouped-query attention with fewer kv heads than tensor ranks.

    The full (kv_heads*D, in) weight lives on every rank (``_tp_duplicate``); this rank computes only rows
    [kv_start*D, (kv_start+kv_count)*D), the kv heads read by its query heads. Ranks sharing a kv head each
    contribute the gradient of their own query heads, so the weight gradient is partial
    (``_tp_partial_grad``: the optimizer sums it over the tensor group). The input enters the tensor region
    like a column-parallel input.
    """

    def __init__(self, linear: nn.Linear, kv_start: int, kv_count: int, head_dim: int, group: Optional[Any],
                 sequence_parallel: bool = False, input_region: bool = True) -> None:
        super().__init__()
        self.group, self.sequence_parallel, self.input_region = group, sequence_parallel, input_region
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rows = slice(kv_start * head_dim, (kv_start + kv_count) * head_dim)
        if self.rows.stop > linear.out_features:
            raise ValueError(f"ReplicatedKVLinear: kv heads [{kv_start}, {kv_start + kv_count}) exceed the weight")
        self.weight = mark_duplicate(linear.weight, partial_grad=True)
        self.bias = mark_duplicate(linear.bias, partial_grad=True) if linear.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_region:
            x = enter_region(x, self.group, self.sequence_parallel)
        bias = None if self.bias is None else self.bias[self.rows]
        return F.linear(x, self.weight[self.rows], bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, local rows {self.rows.start}:{self.rows.stop}"


class TensorParallelRMSNorm(KeepParamMarks, RMSNorm):
    """RMSNorm with tensor-parallel marks, optionally followed by the entry region of the block it feeds.

    ``enter_region=True`` (the norms before attention and MLP): without sequence parallel the copy region
    (one bwd all-reduce for q, k and v together); with it the output is all-gathered along S (bwd
    reduce-scatter). Under sequence parallel the norm runs on this rank's (B, S/T, H) chunk, so its weight
    gradient is partial (``_tp_partial_grad``). The parameter keeps the name ``weight``.
    """

    def __init__(self, norm: RMSNorm, group: Optional[Any], sequence_parallel: bool, enter_region: bool) -> None:
        nn.Module.__init__(self)
        self.eps = norm.eps
        self.weight = mark_duplicate(norm.weight, partial_grad=sequence_parallel)
        self.group, self.sequence_parallel, self.enter_region = group, sequence_parallel, enter_region

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return enter_region(out, self.group, self.sequence_parallel) if self.enter_region else out

    def extra_repr(self) -> str:
        return f"sequence_parallel={self.sequence_parallel}, enter_region={self.enter_region}"


__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "ReplicatedKVLinear",
    "TensorParallelRMSNorm",
    "KeepParamMarks",
    "enter_region",
    "shard_param",
    "mark_shard",
    "mark_duplicate",
]
