"""Ring attention over zigzag shards (context_mode "ring").

Each of the C ranks of the context group holds ``T / C`` tokens (chunks r and 2C-1-r, module `zigzag`) with their
q, k, v. Key/value blocks travel around the ring, rank r sending to r+1 and receiving from r-1:

    forward, step s = 0 .. C-1: rank r holds the k/v block of rank (r - s) mod C; it starts sending that block to
    r+1 (and receiving the next one from r-1), computes its queries against the block at hand, merges the partial
    output by the online softmax (module `block`), then waits for the transfer. C-1 transfers of one k/v block.

    backward, step s: the same k/v block arrives with the dK/dV accumulator of that block. Rank r starts the next
    k/v transfer, computes dQ (kept) and the block's dK/dV contribution (flash-attention backward from the saved
    q, k, v, output and lse), adds it to the accumulator received from r-1 (sent after r-1's step s-1: that
    transfer overlapped this step's compute) and sends the sum on to r+1. After step C-1 the accumulator sent on
    reaches the block's owner: C transfers of dK/dV.

Masks and skipping come from the `ContextShard` (host side, no communication): only the visible pairs of each
(query block, key block) pair are computed, as one unmasked piece per document for the fused kernel
(`ContextShard.pieces`) or as masked rectangles (`ContextShard.block_pairs`); for one long document that is exactly
half of every off-diagonal block (module `zigzag`): each rank does the same work per step.
Messages are one stacked (2, T/C, Hkv, D) tensor (k and v, in the model dtype) and, in the backward, one stacked
dK/dV in the accumulation dtype (fp32: the sum of C contributions stays exact to fp32). All transfers go through
`torch.distributed.batch_isend_irecv` (NCCL and gloo; the simulation's `CommRecorder` records its sends).
"""

from __future__ import annotations

import math
from typing import Any, List, Optional

import torch
import torch.distributed as dist

from .block import acc_dtype, block_backward, block_forward, fused_available, merge_, piece_backward, piece_forward
from .shard import ContextShard

_TAG_KV, _TAG_DKV = 1, 2  # distinct channels: a k/v and a dK/dV transfer are in flight together in the backward


class _Transfer:
    """One step's send to the next rank and receive from the previous one; ``wait()`` returns the received tensor."""

    def __init__(self, send: torch.Tensor, works: List[Any], recv: torch.Tensor) -> None:
        self.send, self.works, self.recv = send, works, recv  # keep ``send`` alive until the transfer completes

    def wait(self) -> torch.Tensor:
        for work in self.works:
            work.wait()
        return self.recv


class Ring:
    """The neighbours of this rank in the context group, as global ranks (what point-to-point ops take)."""

    def __init__(self, group: Optional[Any], size: int, rank: int) -> None:
        self.group, self.size, self.rank = group, size, rank
        base = dist.group.WORLD if group is None else group
        self.next = dist.get_global_rank(base, (rank + 1) % size)
        self.prev = dist.get_global_rank(base, (rank - 1) % size)

    def start(self, send: torch.Tensor, tag: int) -> _Transfer:
        """Send ``send`` to the next rank and receive a tensor of its shape from the previous one, asynchronously."""
        send = send.contiguous()
        recv = torch.empty_like(send)
        ops = [
            dist.P2POp(dist.isend, send, self.next, self.group, tag),
            dist.P2POp(dist.irecv, recv, self.prev, self.group, tag),
        ]
        return _Transfer(send, dist.batch_isend_irecv(ops), recv)


def _pieces(shard: ContextShard, src: int, fused: bool) -> Optional[list]:
    """The document pieces of (my queries, ``src``'s keys) for the fused kernel, or None: the explicit rectangles."""
    return shard.pieces(shard.rank, src) if fused else None


def ring_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    shard: ContextShard,
    ring: Optional[Ring],
    fused: bool = False,
) -> tuple:
    """``(out, lse)`` of this rank's queries against every rank's keys, in the accumulation dtype (module docstring);
    ``fused``: document pieces by the fused kernel where the layout allows, else explicit masked rectangles."""
    size, rank = shard.size, shard.rank
    scale = 1.0 / math.sqrt(q.shape[-1])
    acc = acc_dtype(q.dtype)
    out = torch.zeros(q.shape[:2] + v.shape[2:], dtype=acc, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=acc, device=q.device)
    kv = torch.stack([k, v])
    for step in range(size):
        src = (rank - step) % size
        pending = ring.start(kv, _TAG_KV) if step < size - 1 else None  # overlaps the compute below
        pieces = _pieces(shard, src, fused)
        for piece in pieces or ():
            block_out, block_lse = piece_forward(q[piece.q], kv[0, piece.k], kv[1, piece.k], piece.causal, scale)
            merge_(out[piece.q], lse[piece.q], block_out, block_lse)
        for pair in shard.block_pairs(rank, src) if pieces is None else ():
            visible = None if pair.full else shard.visible(rank, src, pair)
            block_out, block_lse = block_forward(q[pair.q], kv[0, pair.k], kv[1, pair.k], visible, scale)
            merge_(out[pair.q], lse[pair.q], block_out, block_lse)
        if pending is not None:
            kv = pending.wait()
    return out, lse


def ring_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    shard: ContextShard,
    ring: Optional[Ring],
    fused: bool = False,
) -> tuple:
    """``(dq, dk, dv)`` of this rank's q, k, v (module docstring); dK/dV of each block travel with it. ``out`` is the
    forward's output in the model dtype, ``lse`` its log-sum-exp (accumulation dtype)."""
    size, rank = shard.size, shard.rank
    scale = 1.0 / math.sqrt(q.shape[-1])
    acc = acc_dtype(q.dtype)
    delta = (dout.to(acc) * out.to(acc)).sum(dim=-1)  # rowsum(dO * O), (T, Hq)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv = torch.stack([k, v])
    dkv_pending: Optional[_Transfer] = None
    for step in range(size):
        src = (rank - step) % size
        kv_pending = ring.start(kv, _TAG_KV) if step < size - 1 else None
        dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)
        pieces = _pieces(shard, src, fused)
        for piece in pieces or ():
            dq_b, dk_b, dv_b = piece_backward(
                q[piece.q],
                kv[0, piece.k],
                kv[1, piece.k],
                dout[piece.q],
                out[piece.q],
                lse[piece.q],
                piece.causal,
                scale,
            )
            dq[piece.q] += dq_b
            dkv[0, piece.k] += dk_b
            dkv[1, piece.k] += dv_b
        for pair in shard.block_pairs(rank, src) if pieces is None else ():
            visible = None if pair.full else shard.visible(rank, src, pair)
            dq_b, dk_b, dv_b = block_backward(
                q[pair.q], kv[0, pair.k], kv[1, pair.k], dout[pair.q], lse[pair.q], delta[pair.q], visible, scale
            )
            dq[pair.q] += dq_b
            dkv[0, pair.k] += dk_b
            dkv[1, pair.k] += dv_b
        if dkv_pending is not None:  # the accumulator of this block from the ranks it visited before
            dkv += dkv_pending.wait()
        if size > 1:
            dkv_pending = ring.start(dkv, _TAG_DKV)  # to the next rank; the last step's reaches the owner
        if kv_pending is not None:
            kv = kv_pending.wait()
    if dkv_pending is not None:
        dkv = dkv_pending.wait()
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, shard, ring, fused):
        out, lse = ring_forward(q, k, v, shard, ring, fused)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.shard, ctx.ring, ctx.fused = shard, ring, fused
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout.contiguous(), q, k, v, out, lse, ctx.shard, ctx.ring, ctx.fused)
        return dq, dk, dv, None, None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    shard: ContextShard,
    group: Optional[Any],
    backend: str = "auto",
) -> torch.Tensor:
    """Causal attention of this rank's zigzag tokens (q (T/C, Hq, D), k / v (T/C, Hkv, D)) against the whole packed
    sequence; returns (T/C, Hq, D), differentiable in q, k, v. ``group`` is the context group (None: the default
    group), of ``shard.size`` ranks. ``backend`` (resolved: "flash", "sdpa" or "reference"): "reference" computes
    the explicit masked rectangles; any other the document pieces by the fused CPU kernel where it can run (module
    `block`), else the explicit rectangles."""
    if q.shape[0] != shard.local_tokens or k.shape != v.shape or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"ring attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit a shard of "
            f"{shard.local_tokens} tokens with query heads a multiple of key heads"
        )
    ring = Ring(group, shard.size, shard.rank) if shard.size > 1 else None
    fused = backend != "reference" and fused_available(q.device)
    return _RingAttention.apply(q, k, v, shard, ring, fused)


__all__ = ["Ring", "ring_attention", "ring_backward", "ring_forward"]
