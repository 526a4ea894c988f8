"""Attention of one (query block, key/value block) pair with its log-sum-exp, the merge of partial results, and the
flash-attention backward of one block: the arithmetic of ring attention (module `ring`), no communication.

Shapes: q (Tq, Hq, D), k / v (Tk, Hkv, D) with ``Hq = G * R`` (GQA: ``G = Hkv`` groups of ``R`` query heads, query
head ``h`` uses key head ``h // R``, as `packed_causal_attention`'s ``repeat_interleave``). The score tensor is
(G, R, Tq, Tk): q is viewed as (Tq, G, R, D), so k and v are never repeated and dK / dV come out summed over the
R query heads of each key head. ``visible`` is a (Tq, Tk) bool mask, or None when every pair is visible.

Forward of a block, in the accumulation dtype (fp32, or fp64 for fp64 inputs), ``s = q k^T / sqrt(D)`` masked to
-inf, per query row:

    m = max_j s_j            (0 when the row is fully masked)
    lse = m + log sum_j exp(s_j - m)       (-inf when the row is fully masked)
    o = sum_j exp(s_j - lse) v_j           (0 when the row is fully masked: no NaN)

Merge of two partial results (o1, lse1), (o2, lse2) of the same queries over disjoint key sets (online softmax):

    lse = log(exp(lse1) + exp(lse2))
    o = exp(lse1 - lse) o1 + exp(lse2 - lse) o2

Backward of a block, given the FINAL lse and ``delta = rowsum(dO * O)`` of the merged output O:

    P = exp(s - lse)   dV = P^T dO   dP = dO V^T   dS = P * (dP - delta)   dQ = dS K / sqrt(D)   dK = dS^T Q / sqrt(D)

Two ways to compute a block. `block_forward` / `block_backward`: explicit (Tq, Tk) masked matmuls over a rectangle
(`BlockPair`), any mask, the ``reference`` backend. `piece_forward` / `piece_backward`: one fused call per document
`Piece` (no mask: all keys visible, or the causal triangle of the same tokens), torch's CPU flash-attention kernel
(``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward), which returns / takes the same lse and
never materialises the scores, so memory (and the simulation's fake-tensor peak) stays that of one process's sdpa.
On a GPU the same pieces go to flash-attention's varlen forward / backward (document pieces as ``cu_seqlens``,
``causal`` per piece), which return / take the same lse: the ring schedule and the merge do not change; until
then CUDA tensors take the explicit path.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of ``dtype`` inputs: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(T, Hq, D) -> (T, G, R, D) view with G = kv_heads."""
    t, h, d = q.shape
    return q.view(t, kv_heads, h // kv_heads, d)


def _scores(q: torch.Tensor, k: torch.Tensor, visible: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    s = torch.einsum("qgrd,kgd->grqk", _grouped(q, k.shape[1]), k) * scale
    return s if visible is None else s.masked_fill(~visible, float("-inf"))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(G, R, Tq) -> (Tq, G * R): the per-row layout of lse and delta (rows of q)."""
    g, r, t = x.shape
    return x.permute(2, 0, 1).reshape(t, g * r)


def _unrows(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(Tq, Hq) -> (G, R, Tq, 1)."""
    t, h = x.shape
    return x.view(t, kv_heads, h // kv_heads).permute(1, 2, 0).unsqueeze(-1)


def block_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: Optional[torch.Tensor], scale: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(o (Tq, Hq, D), lse (Tq, Hq))`` of one block in the accumulation dtype (module docstring)."""
    acc = acc_dtype(q.dtype)
    s = _scores(q.to(acc), k.to(acc), visible, scale)
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a fully masked row: exp(-inf - 0) = 0, not NaN
    p = torch.exp(s - m)
    total = p.sum(dim=-1, keepdim=True)
    lse = (m + torch.log(total)).squeeze(-1)  # log(0) = -inf for a fully masked row
    p = p / torch.where(total > 0, total, torch.ones_like(total))
    o = torch.einsum("grqk,kgd->qgrd", p, v.to(acc))
    return o.reshape(q.shape[0], q.shape[1], v.shape[2]), _rows(lse)


def merge_(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Merge a block's ``(block_out, block_lse)`` into the running ``(out, lse)`` in place (module docstring)."""
    new = torch.logaddexp(lse, block_lse)
    safe = torch.where(torch.isfinite(new), new, torch.zeros_like(new))  # both -inf: weights exp(-inf) = 0
    out.mul_(torch.exp(lse - safe).unsqueeze(-1)).add_(torch.exp(block_lse - safe).unsqueeze(-1) * block_out)
    lse.copy_(new)


def block_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    visible: Optional[torch.Tensor],
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq (Tq, Hq, D), dk (Tk, Hkv, D), dv (Tk, Hkv, D))`` of one block in the accumulation dtype, from the final
    ``lse`` and ``delta = rowsum(dO * O)`` (both (Tq, Hq)) of its queries (module docstring)."""
    acc = acc_dtype(q.dtype)
    g = k.shape[1]
    q, k, v, dout = q.to(acc), k.to(acc), v.to(acc), dout.to(acc)
    p = torch.exp(_scores(q, k, visible, scale) - _unrows(lse, g))  # masked: exp(-inf) = 0
    gdout = _grouped(dout, g)
    dv = torch.einsum("grqk,qgrd->kgd", p, gdout)
    dp = torch.einsum("qgrd,kgd->grqk", gdout, v)
    ds = p * (dp - _unrows(delta, g))
    dq = torch.einsum("grqk,kgd->qgrd", ds, k).reshape(q.shape) * scale
    dk = torch.einsum("grqk,qgrd->kgd", ds, _grouped(q, g)) * scale
    return dq, dk, dv


_FUSED = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FUSED_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def fused_available(device: torch.device) -> bool:
    """Whether `piece_forward` / `piece_backward` can run on ``device`` (torch's CPU flash-attention kernel)."""
    return device.type == "cpu" and _FUSED is not None and _FUSED_BACKWARD is not None


def _heads_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(T, h, D) -> (1, heads, T, D), kv heads repeated as `packed_causal_attention` does (the kernel has no GQA)."""
    if x.shape[1] != heads:
        x = x.repeat_interleave(heads // x.shape[1], dim=1)
    return x.transpose(0, 1)[None]


def piece_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(o (Tq, Hq, D), lse (Tq, Hq))`` of one unmasked `Piece` (every key visible, or causal on the same tokens) by
    the fused kernel, in the accumulation dtype."""
    acc, heads = acc_dtype(q.dtype), q.shape[1]
    out, lse = _FUSED(_heads_first(q, heads), _heads_first(k, heads), _heads_first(v, heads), 0.0, causal, scale=scale)
    return out[0].transpose(0, 1).to(acc), lse[0].transpose(0, 1).to(acc)


def piece_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of one `Piece` by the fused backward, given the FINAL merged output ``out`` (model dtype) and
    ``lse`` (Tq, Hq) of its queries; in the accumulation dtype, dk / dv summed over the query heads of each kv head."""
    acc, heads, kv_heads = acc_dtype(q.dtype), q.shape[1], k.shape[1]
    kernel_lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32).transpose(0, 1)[None]
    dq, dk, dv = _FUSED_BACKWARD(
        _heads_first(dout, heads),
        _heads_first(q, heads),
        _heads_first(k, heads),
        _heads_first(v, heads),
        _heads_first(out, heads),
        kernel_lse.contiguous(),
        0.0,
        causal,
        scale=scale,
    )
    dq = dq[0].transpose(0, 1).to(acc)
    dk, dv = (
        g[0].transpose(0, 1).to(acc).reshape(g.shape[2], kv_heads, heads // kv_heads, -1).sum(2) for g in (dk, dv)
    )
    return dq, dk, dv


__all__ = [
    "acc_dtype",
    "block_forward",
    "block_backward",
    "fused_available",
    "merge_",
    "piece_backward",
    "piece_forward",
]
