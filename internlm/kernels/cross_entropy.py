"""LM head + cross-entropy fused and chunked over tokens: the full (tokens, V) logits are never materialised.

``chunked_linear_cross_entropy(hidden, weight, labels)`` equals

    F.cross_entropy(hidden @ weight.T, labels, reduction="sum", label_smoothing=eps, ignore_index=ignore_index)

(fp32 loss). For every chunk of ``chunk_tokens`` tokens the forward computes logits x = h @ W^T in the input dtype,
the per-token statistics of this process's vocab rows (``ce_stats``: local max m, sum exp(x - m), label logit,
sum x), combines them over the vocab shards when ``weight`` is one (`VocabShard.combine`, supplied by
`internlm.parallel.cross_entropy`, which all-reduces them: this module knows no process group), and takes

    M = max_v x_v,   S = sum_v exp(x_v - M),   lse = M + log S,   X = sum_v x_v
    loss = (1 - eps) (lse - x_label) + eps (lse - X / V)       (0 for labels == ignore_index)

and, right away, the backward of the chunk (the logits buffer is overwritten with its gradient):

    d loss / d x_v = exp(x_v - lse) - (1 - eps) [v == label] - eps / V      (0 rows for ignored tokens)
    d hidden[chunk] = dx @ W,    d W += dx^T @ h

Only d hidden (tokens, H) and d W (V_local, H) are kept for the autograd backward, which scales them by the
incoming gradient. Peak extra memory: those two plus one (chunk_tokens, V_local) logits buffer in the input
dtype (Triton path; the eager fallback adds one fp32 copy of it) instead of several (tokens, V) fp32 tensors.

Vocab shards: ``weight`` holds rows [start, start + V_local) of a head of ``total`` rows (`VocabShard`),
``hidden`` is the same on every shard and ``labels`` are global ids. After ``combine`` the loss is the full loss
on every shard; d hidden is this shard's partial sum (sum_v over its own rows), so the caller must sum it over the
shards in the backward (`internlm.parallel.cross_entropy.fused_head_loss` lets ``hidden`` enter the tensor region,
as the column-parallel lm_head does); d W is local.

``d W`` accumulates chunk by chunk in ``weight``'s dtype (one rounding per chunk in bf16, as Liger-Kernel does).
Labels must be in [0, V) or ``ignore_index`` (not checked: checking would synchronise with the device).

The per-chunk statistics and gradient run as the torch custom ops ``internlm::ce_stats`` and ``internlm::ce_grad_``
(which overwrites the logits), with fake implementations; the shards' ``combine`` runs between them, outside any
op, so a collective is never hidden in an op (nor in a fake implementation).
"""

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from internlm.labels import IGNORE_INDEX

from .dispatch import TRITON_DTYPES, acc_dtype, load_triton, use_triton

CHUNK_BYTES = 256 * 2**20  # default: the largest power-of-two chunk whose fp32 logits fit in this


def default_chunk_tokens(vocab_local: int) -> int:
    tokens = max(1, CHUNK_BYTES // (4 * max(1, vocab_local)))
    return max(16, 1 << (tokens.bit_length() - 1))


def ce_stats_eager(logits: torch.Tensor, local_label: torch.Tensor, smooth: bool) -> torch.Tensor:
    """(4, rows): local max m, sum exp(x - m), label logit (0 where local_label < 0), sum x (0 unless smooth)."""
    z = logits.to(acc_dtype(logits.dtype), copy=True)
    m = z.amax(-1)
    x_label = z.gather(-1, local_label.clamp(min=0)[:, None]).squeeze(-1).masked_fill(local_label < 0, 0.0)
    sum_x = z.sum(-1) if smooth else torch.zeros_like(m)
    sum_exp = z.sub_(m[:, None]).exp_().sum(-1)
    return torch.stack([m, sum_exp, x_label, sum_x])


def ce_grad_eager_(logits, local_label, lse, scale, label_smoothing: float, vocab_total: int) -> torch.Tensor:
    """Overwrite ``logits`` with scale[row] * (softmax - (1 - eps) onehot(label) - eps / V)."""
    acc = acc_dtype(logits.dtype)
    g = logits if logits.dtype == acc else logits.to(acc)
    g.sub_(lse[:, None]).exp_()
    if label_smoothing > 0:
        g.sub_(label_smoothing / vocab_total)
    owned = (local_label >= 0).to(acc)[:, None]
    g.scatter_add_(-1, local_label.clamp(min=0)[:, None], -(1.0 - label_smoothing) * owned)
    g.mul_(scale[:, None])
    if g is not logits:
        logits.copy_(g)
    return logits


@torch.library.custom_op("internlm::ce_stats", mutates_args=())
def ce_stats_op(logits: torch.Tensor, local_label: torch.Tensor, smooth: bool, kernel: bool) -> torch.Tensor:
    """(4, rows) statistics of a logits chunk (`ce_stats_eager`): the Triton kernel if ``kernel``, else eager."""
    return (
        load_triton().ce_stats(logits, local_label, smooth) if kernel else ce_stats_eager(logits, local_label, smooth)
    )


@ce_stats_op.register_fake
def _(logits: torch.Tensor, local_label: torch.Tensor, smooth: bool, kernel: bool) -> torch.Tensor:
    return logits.new_empty((4, logits.shape[0]), dtype=acc_dtype(logits.dtype))


@torch.library.custom_op("internlm::ce_grad_", mutates_args=("logits",))
def ce_grad_op_(
    logits: torch.Tensor,
    local_label: torch.Tensor,
    lse: torch.Tensor,
    scale: torch.Tensor,
    label_smoothing: float,
    vocab_total: int,
    kernel: bool,
) -> None:
    """Overwrite ``logits`` with its gradient (`ce_grad_eager_`): the Triton kernel if ``kernel``, else eager."""
    (load_triton().ce_grad_ if kernel else ce_grad_eager_)(
        logits, local_label, lse, scale, label_smoothing, vocab_total
    )


@ce_grad_op_.register_fake
def _(logits, local_label, lse, scale, label_smoothing: float, vocab_total: int, kernel: bool) -> None:
    return None


Stats = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""Per-token ``(m, sum exp(x - m), x_label, sum x)`` of a chunk, each (rows,) fp32 (the rows of `ce_stats_eager`)."""


@dataclass(frozen=True)
class VocabShard:
    """``weight`` holds rows [``start``, ``start`` + V_local) of a head of ``total`` rows; ``combine`` turns the
    shard's `Stats` of a chunk into those of the full vocabulary (M = max of the m's, S = sum of the sums rescaled
    to M, the label logit and sum x summed): the caller's collective, called once per chunk on every shard."""

    start: int
    total: int
    combine: Callable[[Stats], Stats]


def _token_loss(stats: Stats, vocab_total: int, label_smoothing: float, valid: torch.Tensor):
    """Per-token loss and log-sum-exp of a chunk from its full-vocabulary statistics."""
    m, sum_exp, x_label, sum_x = stats
    lse = m + sum_exp.log()
    loss = lse - x_label
    if label_smoothing > 0:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - sum_x / vocab_total)
    return loss.masked_fill(~valid, 0.0), lse


def _linear_cross_entropy(hidden, weight, labels, shard, ignore_index, label_smoothing, chunk_tokens, need_dh, need_dw):
    """Loss (0-dim, fp32) and, when asked, d hidden and d weight for an incoming gradient of 1."""
    size = hidden.shape[-1]
    hidden2d, labels1d = hidden.reshape(-1, size), labels.reshape(-1).long()
    vocab_local = weight.shape[0]
    vocab_total, vocab_start = (vocab_local, 0) if shard is None else (shard.total, shard.start)
    chunk = chunk_tokens or default_chunk_tokens(vocab_local)
    kernel = use_triton("linear_cross_entropy", hidden, weight, supported=hidden.dtype in TRITON_DTYPES)

    loss = torch.zeros((), dtype=acc_dtype(hidden.dtype), device=hidden.device)
    dh = torch.empty(hidden2d.shape, dtype=hidden.dtype, device=hidden.device) if need_dh else None
    dw = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device) if need_dw else None
    for start in range(0, hidden2d.shape[0], chunk):
        h, lab = hidden2d[start : start + chunk], labels1d[start : start + chunk]
        logits = h @ weight.t()  # (chunk, V_local), input dtype: the only vocab-sized buffer
        valid = lab != ignore_index
        local = lab - vocab_start
        local = torch.where(valid & (local >= 0) & (local < vocab_local), local, -1)
        stats = ce_stats_op(logits, local, label_smoothing > 0, kernel).unbind(0)
        if shard is not None:
            stats = shard.combine(stats)
        token_loss, lse = _token_loss(stats, vocab_total, label_smoothing, valid)
        loss += token_loss.sum()
        if need_dh or need_dw:
            ce_grad_op_(logits, local, lse, valid.to(lse.dtype), label_smoothing, vocab_total, kernel)
            if need_dh:
                torch.mm(logits, weight, out=dh[start : start + chunk])
            if need_dw:
                dw.addmm_(logits.t(), h)
        del logits
    return loss, (dh.view(hidden.shape) if need_dh else None), dw


class ChunkedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, shard, ignore_index, label_smoothing, chunk_tokens):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        args = (shard, ignore_index, label_smoothing, chunk_tokens, need_dh, need_dw)
        loss, dh, dw = _linear_cross_entropy(hidden, weight, labels, *args)
        # saved like any activation (saved_tensors_hooks see them); autograd frees them after the backward
        ctx.save_for_backward(dh, dw)
        ctx.scaled = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.scaled:
            raise RuntimeError("chunked_linear_cross_entropy: a second backward (retain_graph) is not supported")
        dh, dw = ctx.saved_tensors
        ctx.scaled = True  # the gradients are scaled in place and handed over
        for grad in (dh, dw):
            if grad is not None:
                grad.mul_(grad_loss)
        return dh, dw, None, None, None, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
    chunk_tokens: Optional[int] = None,
    shard: Optional[VocabShard] = None,
) -> torch.Tensor:
    """fp32 SUM over tokens of the cross-entropy of ``hidden @ weight.T`` (see the module docstring).

    hidden: (..., H); weight: (V_local, H), same dtype; labels: hidden's leading shape, global ids.
    chunk_tokens: tokens per chunk (default `default_chunk_tokens`: fp32 chunk logits of at most 256 MiB).
    shard: where ``weight``'s rows lie in a vocab-split head and how the shards' statistics combine
    (`VocabShard`; `internlm.parallel.cross_entropy.fused_head_loss` builds it for a tensor group), or None for a
    whole head.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on token dims")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.dtype != hidden.dtype:
        raise ValueError(
            f"weight {tuple(weight.shape)} {weight.dtype} does not fit hidden {tuple(hidden.shape)} {hidden.dtype}"
        )
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if shard is not None and not 0 <= shard.start <= shard.total - weight.shape[0]:
        raise ValueError(f"vocab shard rows [{shard.start}, +{weight.shape[0]}) lie outside a head of {shard.total}")
    args = (shard, ignore_index, float(label_smoothing), chunk_tokens)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return ChunkedLinearCrossEntropyFunction.apply(hidden, weight, labels, *args)
    return _linear_cross_entropy(hidden, weight, labels, *args, False, False)[0]


__all__ = [
    "ChunkedLinearCrossEntropyFunction",
    "Stats",
    "VocabShard",
    "ce_grad_eager_",
    "ce_grad_op_",
    "ce_stats_eager",
    "ce_stats_op",
    "chunked_linear_cross_entropy",
    "default_chunk_tokens",
]
