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

Every layer declares the `TPShard` of each of its parameters (``layer.tp_shards``); each has one
constructor, which allocates this rank's (uninitialised) parameters: `parallelize_model` copies values in, or
`InternLM.init_weights` draws them.
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
from .tp_shard import TPShard, declare_shards


def enter_region(x: torch.Tensor, group: Optional[Any], sequence_parallel: bool) -> torch.Tensor:
    """Make a replicated (or sequence-sharded) input usable by split-output layers."""
    if sequence_parallel:
        return gather_from_sequence_region(x, group)
    return copy_to_tensor_region(x, group)


def _param(shard: TPShard, device: Any, dtype: Optional[torch.dtype]) -> nn.Parameter:
    # uninitialised: values come from InternLM.init_weights (which reads the shards) or parallelize_model
    return nn.Parameter(torch.empty(shard.local_shape, device=device, dtype=dtype))


class ColumnParallelLinear(nn.Module):
    """y[..., out/T] = x @ W_rank^T + b_rank; see the module docstring for the communication.

    ``input_region=False`` skips the input copy/gather because the caller (a `TensorParallelRMSNorm`) already did it
    once for several layers sharing the same input.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        group: Optional[Any],
        sequence_parallel: bool = False,
        input_region: bool = True,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.group, self.sequence_parallel, self.input_region = group, sequence_parallel, input_region
        size, rank = group_size(group), group_rank(group)
        if out_features % size:
            raise ValueError(f"ColumnParallelLinear: out_features {out_features} not divisible by tensor size {size}")
        self.in_features, self.out_features = in_features, out_features
        shards = {"weight": TPShard.split((out_features, in_features), 0, rank, size)}
        if bias:
            shards["bias"] = TPShard.split((out_features,), 0, rank, size)
        declare_shards(self, **shards)
        self.weight = _param(shards["weight"], device, dtype)
        self.bias = _param(shards["bias"], device, dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_region:
            x = enter_region(x, self.group, self.sequence_parallel)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features} (local {self.weight.shape[0]}), "
            f"sequence_parallel={self.sequence_parallel}, input_region={self.input_region}"
        )


class RowParallelLinear(nn.Module):
    """y = reduce_T(x_rank @ W_rank^T) + b, with x already split along its last dim.

    Under sequence parallel the bias is added to this rank's sequence chunk only, so its gradient is
    partial: its record is replicated with ``partial_grad``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        group: Optional[Any],
        sequence_parallel: bool = False,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        size, rank = group_size(group), group_rank(group)
        if in_features % size:
            raise ValueError(f"RowParallelLinear: in_features {in_features} not divisible by tensor size {size}")
        self.in_features, self.out_features = in_features, out_features
        shards = {"weight": TPShard.split((out_features, in_features), 1, rank, size)}
        if bias:
            shards["bias"] = TPShard.replicated((out_features,), rank, size, partial_grad=sequence_parallel)
        declare_shards(self, **shards)
        self.weight = _param(shards["weight"], device, dtype)
        self.bias = _param(shards["bias"], device, dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x, self.weight)  # (B, S, out): this rank's share of the sum over in-features
        if self.sequence_parallel:
            out = reduce_scatter_to_sequence_region(partial, self.group)
        else:
            out = reduce_from_tensor_region(partial, self.group)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features} (local {self.weight.shape[1]}), out={self.out_features}, "
            f"sequence_parallel={self.sequence_parallel}"
        )


class VocabParallelEmbedding(nn.Module):
    """Embedding whose vocab rows are split over the tensor group (ids outside this rank's range -> 0)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        group: Optional[Any],
        sequence_parallel: bool = False,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        size, rank = group_size(group), group_rank(group)
        if num_embeddings % size:
            raise ValueError(f"VocabParallelEmbedding: vocab {num_embeddings} not divisible by tensor size {size}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        shard = TPShard.split((num_embeddings, embedding_dim), 0, rank, size)
        declare_shards(self, weight=shard)
        self.weight = _param(shard, device, dtype)

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


class ReplicatedKVLinear(nn.Module):
    """k or v projection for grouped-query attention with fewer kv heads than tensor ranks.

    The full (kv_heads*D, in) weight lives on every rank (replicated); this rank computes only rows
    [kv_start*D, (kv_start+kv_count)*D), the kv heads read by its query heads. Ranks sharing a kv head each
    contribute the gradient of their own query heads, so the weight gradient is partial (``partial_grad``: the
    optimizer sums it over the tensor group). The input enters the tensor region like a column-parallel input.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        kv_start: int,
        kv_count: int,
        head_dim: int,
        group: Optional[Any],
        sequence_parallel: bool = False,
        input_region: bool = True,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.group, self.sequence_parallel, self.input_region = group, sequence_parallel, input_region
        self.in_features, self.out_features = in_features, out_features
        self.rows = slice(kv_start * head_dim, (kv_start + kv_count) * head_dim)
        if self.rows.stop > out_features:
            raise ValueError(f"ReplicatedKVLinear: kv heads [{kv_start}, {kv_start + kv_count}) exceed the weight")
        size, rank = group_size(group), group_rank(group)
        shards = {"weight": TPShard.replicated((out_features, in_features), rank, size, partial_grad=True)}
        if bias:
            shards["bias"] = TPShard.replicated((out_features,), rank, size, partial_grad=True)
        declare_shards(self, **shards)
        self.weight = _param(shards["weight"], device, dtype)
        self.bias = _param(shards["bias"], device, dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_region:
            x = enter_region(x, self.group, self.sequence_parallel)
        bias = None if self.bias is None else self.bias[self.rows]
        return F.linear(x, self.weight[self.rows], bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, local rows {self.rows.start}:{self.rows.stop}"


class TensorParallelRMSNorm(RMSNorm):
    """RMSNorm replicated over the tensor group, optionally followed by the entry region of the block it feeds.

    ``enter_region=True`` (the norms before attention and MLP): without sequence parallel the copy region
    (one bwd all-reduce for q, k and v together); with it the output is all-gathered along S (bwd
    reduce-scatter). Under sequence parallel the norm runs on this rank's (B, S/T, H) chunk, so its weight
    gradient is partial (``partial_grad``). The parameter keeps the name ``weight``.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float,
        group: Optional[Any],
        sequence_parallel: bool,
        enter_region: bool,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        nn.Module.__init__(self)
        self.eps = eps
        self.group, self.sequence_parallel, self.enter_region = group, sequence_parallel, enter_region
        shard = TPShard.replicated((hidden_size,), group_rank(group), group_size(group), partial_grad=sequence_parallel)
        declare_shards(self, weight=shard)
        self.weight = _param(shard, device, dtype)

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
    "enter_region",
]
