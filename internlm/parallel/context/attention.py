"""The attention of a layer under context parallelism: `context_attention` and the module `ContextAttentionCore`
that takes the place of the model's `AttentionCore` (same forward signature; ``docs`` is a `ContextShard`)."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn

from internlm.model.attention import PackedDocs, packed_causal_attention, resolve_backend

from .a2a import a2a_attention
from .ring import ring_attention
from .shard import ContextShard


def context_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    shard: ContextShard,
    group: Optional[Any],
    backend: str = "auto",
) -> torch.Tensor:
    """Causal attention of this rank's tokens of a packed sequence split over the context group.

    q (T_local, Hq, D), k / v (T_local, Hkv, D): the heads this rank holds after tensor parallelism, tokens in the
    shard's order (`ContextShard.index`). Returns (T_local, Hq, D), equal to the rows ``shard.index`` of one
    process's `packed_causal_attention` over the whole sequence; differentiable in q, k, v.

    ``shard.mode`` "ring": `ring_attention` (k/v blocks around the ring; "reference" computes explicit masked
    blocks in fp32, any other backend one fused CPU kernel call per document piece, explicit blocks on CUDA for
    now); "a2a": `a2a_attention` (all-to-all over heads, then ``backend``). ``group`` None falls back to
    ``shard.group``; one rank is plain `packed_causal_attention`.
    """
    if shard.size == 1:
        return packed_causal_attention(q, k, v, shard.global_docs, backend, shard.max_seqlen)
    group = shard.group if group is None else group
    if shard.mode == "ring":
        return ring_attention(q, k, v, shard, group, resolve_backend(backend, q.device, q.dtype))
    return a2a_attention(q, k, v, shard, group, backend)


class ContextAttentionCore(nn.Module):
    """`AttentionCore` under context parallelism: ``forward(q, k, v, docs, backend, max_seqlen=None)`` with ``docs``
    the micro-batch's `ContextShard` (a plain `PackedDocs` runs one-process attention). No parameters, so
    activation checkpointing can recompute it alone, as the module it replaces. ``max_seqlen`` is ignored: the shard
    carries the global longest document."""

    def __init__(self, group: Optional[Any]) -> None:
        super().__init__()
        self.group = group

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        docs: Union[ContextShard, PackedDocs],
        backend: str,
        max_seqlen: Optional[int] = None,
    ) -> torch.Tensor:
        if isinstance(docs, PackedDocs):
            return packed_causal_attention(q, k, v, docs, backend, max_seqlen)
        return context_attention(q, k, v, docs, self.group, backend)

    def __deepcopy__(self, memo: dict) -> "ContextAttentionCore":
        # a process group cannot be deep-copied; a copy of the model shares it
        copy = ContextAttentionCore(self.group)
        memo[id(self)] = copy
        return copy


__all__ = ["ContextAttentionCore", "context_attention"]
