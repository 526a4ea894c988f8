"""Triton kernels for the softmax / cross-entropy part of one token chunk (see `cross_entropy` for the math).

``ce_stats`` reads a (rows, V_local) logits chunk once (online max / sum-exp) and returns per-row fp32 statistics;
``ce_grad_`` overwrites the logits chunk with d loss / d logits in the logits' dtype, so no fp32 (rows, V) copy
is ever made on this path.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def _ce_stats(LOGITS, stride, LABEL, STATS, rows, vocab, BLOCK_V: tl.constexpr, SMOOTH: tl.constexpr):
    """STATS[:, row] = (m, sum_v exp(x_v - m), x_label or 0, sum_v x_v or 0) over this rank's vocab slice."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    m = tl.full([], float("-inf"), tl.float32)
    sum_exp = tl.zeros([], dtype=tl.float32)
    sum_x = tl.zeros([], dtype=tl.float32)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        sum_exp = sum_exp * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
        if SMOOTH:
            sum_x += tl.sum(tl.where(cols < vocab, x, 0.0), axis=0)
    label = tl.load(LABEL + row)
    x_label = tl.load(base + tl.maximum(label, 0), mask=label >= 0, other=0.0).to(tl.float32)
    tl.store(STATS + row, m)
    tl.store(STATS + rows + row, sum_exp)
    tl.store(STATS + 2 * rows + row, x_label)
    tl.store(STATS + 3 * rows + row, sum_x)


@triton.jit
def _ce_grad(LOGITS, stride, LABEL, LSE, SCALE, vocab, smooth_per_v, on_label, BLOCK_V: tl.constexpr):
    """LOGITS[row, v] <- scale * (exp(x_v - lse) - eps / V - (1 - eps) [v == label])."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    lse = tl.load(LSE + row)
    scale = tl.load(SCALE + row)
    label = tl.load(LABEL + row)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < vocab
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) - smooth_per_v
        g = tl.where(cols == label, g - on_label, g)
        tl.store(base + cols, (g * scale).to(LOGITS.dtype.element_ty), mask=mask)


def ce_launch(vocab: int) -> Tuple[int, int]:
    """(BLOCK_V, num_warps) of both kernels for a V_local-wide row: up to 4096 logits per loop step, 8 warps."""
    return min(4096, triton.next_power_of_2(vocab)), 8


def ce_stats(logits: torch.Tensor, local_label: torch.Tensor, smooth: bool) -> torch.Tensor:
    """logits: (rows, V_local), unit stride along V; local_label: (rows,) int64, -1 where not on this rank.

    Returns (4, rows) fp32: local max m, sum exp(x - m), the label's logit (0 if not here), sum of logits.
    """
    rows, vocab = logits.shape
    stats = torch.empty((4, rows), dtype=torch.float32, device=logits.device)
    block, warps = ce_launch(vocab)
    _ce_stats[(rows,)](
        logits, logits.stride(0), local_label, stats, rows, vocab, BLOCK_V=block, SMOOTH=smooth, num_warps=warps
    )
    return stats


def ce_grad_(
    logits: torch.Tensor,
    local_label: torch.Tensor,
    lse: torch.Tensor,
    scale: torch.Tensor,
    label_smoothing: float,
    vocab_total: int,
) -> torch.Tensor:
    """Overwrite ``logits`` with scale[row] * (softmax - (1 - eps) onehot(label) - eps / V); returns it."""
    rows, vocab = logits.shape
    block, warps = ce_launch(vocab)
    _ce_grad[(rows,)](
        logits,
        logits.stride(0),
        local_label,
        lse,
        scale,
        vocab,
        label_smoothing / vocab_total,
        1.0 - label_smoothing,
        BLOCK_V=block,
        num_warps=warps,
    )
    return logits
