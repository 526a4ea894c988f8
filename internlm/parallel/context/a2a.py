"""All-to-all over heads (context_mode "a2a"; Ulysses, InternEvo's ISP).

Each of the C ranks holds a contiguous chunk of ``t = T / C`` tokens with all the heads this rank has after tensor
parallelism (Hq query heads, Hkv key/value heads). One all-to-all turns the sequence-sharded q, k, v into head-sharded
tensors over the whole sequence, attention runs as in one process (`packed_causal_attention` on the global document
boundaries, any backend), and one all-to-all turns the output back:

    q (t, Hq, D) -> (C, t, Hq/C, D): block j = heads [j Hq/C, (j+1) Hq/C) of my tokens, sent to rank j
    all_to_all  -> (C, t, Hq/C, D): block j = rank j's tokens of my heads -> (T, Hq/C, D) in global order
    attention on (T, Hq/C, D) and (T, L/C, D) -> out (T, Hq/C, D)
    out -> (C, t, Hq/C, D): block j = rank j's tokens -> all_to_all -> my tokens of every head -> (t, Hq, D)

q, k and v share one all-to-all (concatenated along the head dimension per destination). The backward of each
all-to-all is the inverse all-to-all (autograd Function `_SeqToHeads` / `_HeadsToSeq`, each the other's backward).

Heads: Hq must be divisible by C. Key/value heads not divisible by C are replicated: each is repeated
``n = lcm(Hkv, C) / Hkv`` times (``repeat_interleave``, so query head h still reads original key head
``h // (Hq / Hkv)``), giving ``L = lcm(Hkv, C)`` key heads, which Hq (a multiple of both Hkv and C) divides. The
replication costs ``n`` times the key/value bytes of the all-to-all; the gradients of the copies are summed back by
autograd. Bytes each rank sends per layer: ``(C-1)/C * t * (Hq + 2 L) * D`` elements forward (q, k, v) plus
``(C-1)/C * t * Hq * D`` (the output), and the same again in the backward.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.distributed as dist

from internlm.model.attention import packed_causal_attention

from .shard import ContextShard


def _all_to_all(x: torch.Tensor, group: Optional[Any]) -> torch.Tensor:
    """Block j of dim 0 of ``x`` goes to rank j; block j of the result came from rank j."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def seq_to_heads(x: torch.Tensor, group: Optional[Any], size: int) -> torch.Tensor:
    """(t, H, D) of my tokens -> (size * t, H / size, D): every rank's tokens of my head group, in rank order."""
    t, h, d = x.shape
    send = x.reshape(t, size, h // size, d).transpose(0, 1)  # (size, t, H/size, D): block j to rank j
    return _all_to_all(send, group).reshape(size * t, h // size, d)


def heads_to_seq(x: torch.Tensor, group: Optional[Any], size: int) -> torch.Tensor:
    """(size * t, H / size, D) -> (t, H, D): the inverse of `seq_to_heads`."""
    total, hs, d = x.shape
    recv = _all_to_all(x.reshape(size, total // size, hs, d), group)  # block j: my tokens of rank j's heads
    return recv.transpose(0, 1).reshape(total // size, size * hs, d)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, size):
        ctx.group, ctx.size = group, size
        return seq_to_heads(x, group, size)

    @staticmethod
    def backward(ctx, grad):
        return heads_to_seq(grad, ctx.group, ctx.size), None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, size):
        ctx.group, ctx.size = group, size
        return heads_to_seq(x, group, size)

    @staticmethod
    def backward(ctx, grad):
        return seq_to_heads(grad, ctx.group, ctx.size), None, None


def kv_replication(kv_heads: int, size: int) -> int:
    """How many times each key/value head is repeated so that a2a over ``size`` ranks divides them:
    ``lcm(kv_heads, size) / kv_heads`` (1 when ``size`` divides ``kv_heads``)."""
    return size // math.gcd(kv_heads, size)


def a2a_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    shard: ContextShard,
    group: Optional[Any],
    backend: str = "auto",
) -> torch.Tensor:
    """Causal attention of this rank's contiguous tokens (q (t, Hq, D), k / v (t, Hkv, D)) against the whole packed
    sequence by all-to-all over heads (module docstring); returns (t, Hq, D), differentiable in q, k, v."""
    size = shard.size
    t, hq, d = q.shape
    if hq % size:
        raise ValueError(
            f"context_mode='a2a' needs the {hq} query heads of each tensor rank divisible by parallel.context={size}; "
            f"use context_mode='ring' or another parallel.context"
        )
    if t != shard.local_tokens or k.shape != v.shape or hq % k.shape[1]:
        raise ValueError(
            f"a2a attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit a shard of "
            f"{shard.local_tokens} tokens with query heads a multiple of key heads"
        )
    rep = kv_replication(k.shape[1], size)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    kv = k.shape[1]
    # one all-to-all for q, k and v: per destination j, its query heads then its key heads then its value heads
    per_rank = [x.reshape(t, size, x.shape[1] // size, d) for x in (q, k, v)]
    qkv = torch.cat(per_rank, dim=2).reshape(t, hq + 2 * kv, d)
    heads = _SeqToHeads.apply(qkv, group, size)
    qh, kh, vh = (x.contiguous() for x in heads.split([hq // size, kv // size, kv // size], dim=1))
    out = packed_causal_attention(qh, kh, vh, shard.global_docs, backend, shard.max_seqlen)
    return _HeadsToSeq.apply(out.contiguous(), group, size)


__all__ = ["a2a_attention", "heads_to_seq", "kv_replication", "seq_to_heads"]
