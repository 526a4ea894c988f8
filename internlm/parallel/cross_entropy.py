"""Cross-entropy over vocab-split logits, never gathering the full (tokens, V) logits.

Each tensor rank holds logits[..., rank*V/T : (rank+1)*V/T]. With z the logits shifted by the global max m:

    log Z   = log sum_v exp(z_v)                       (local sum-exp, all-reduce SUM)
    nll     = log Z - z_label                          (the rank owning the label contributes z_label, SUM)
    smooth  = mean_v(-log p_v) = log Z - sum_v(z_v) / V   (local sums, all-reduce SUM)
    loss    = (1 - eps) * nll + eps * smooth           (as F.cross_entropy with label_smoothing=eps)

Forward communication per token: one all-reduce MAX of m and one all-reduce SUM of the stacked
(z_label, sum exp, sum z) triple. Backward is local: d loss / d z_v = p_v - (1 - eps) [v == label] - eps / V,
using the softmax kept from the forward. Tokens whose label is ``ignore_index`` get loss 0 and gradient 0.

`make_loss_fn` also takes the `HeadInput` that a model chunk with ``fuse_head_loss`` returns (the trainer's default,
``model.fused_loss``): the head and the loss then run fused and chunked over tokens
(`internlm.kernels.chunked_linear_cross_entropy`, the same math), so neither the (tokens, V / T) logits nor their
fp32 copies ever exist. The kernel knows no process group: `vocab_shard` hands it this rank's rows and
`combine_vocab_stats`, the per-chunk reduction over the tensor group (the two collectives above, on the local
statistics m, sum exp(x - m), x_label, sum x):

    M = MAX_ranks m,   (S, x_label, X) = SUM_ranks (sum exp(x - m) * exp(m - M), x_label, sum x)

Both vocab-parallel losses reduce through `_global_max_` and `_global_sums_`, the only collectives here.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from internlm.kernels import VocabShard, chunked_linear_cross_entropy
from internlm.kernels.cross_entropy import Stats
from internlm.labels import IGNORE_INDEX
from internlm.model import HeadInput

from .comm import all_reduce_, group_rank, group_size
from .pipeline.steps import LossFn
from .process_groups import ParallelContext
from .tensor_parallel import ColumnParallelLinear, enter_region


def _global_max_(x: torch.Tensor, group: Optional[Any]) -> torch.Tensor:
    """Per-token max over the vocab shards, in place (a no-op for one rank)."""
    all_reduce_(x, group, dist.ReduceOp.MAX)
    return x


def _global_sums_(stacked: torch.Tensor, group: Optional[Any]) -> torch.Tensor:
    """Per-token sums over the vocab shards, in place: one collective for all the stacked sums."""
    all_reduce_(stacked, group)
    return stacked


def combine_vocab_stats(stats: Stats, group: Any) -> Stats:
    """The full-vocabulary `Stats` of a chunk from this rank's (see the module docstring); every rank gets them."""
    m, sum_exp, x_label, sum_x = stats
    global_max = _global_max_(m.clone(), group)
    sums = _global_sums_(torch.stack([sum_exp * torch.exp(m - global_max), x_label, sum_x]), group)
    sum_exp, x_label, sum_x = sums.unbind(0)
    return global_max, sum_exp, x_label, sum_x


def vocab_shard(group: Any, vocab_local: int) -> VocabShard:
    """This rank's `VocabShard` of a head split over ``group`` in pieces of ``vocab_local`` rows (rank order)."""
    return VocabShard(
        start=group_rank(group) * vocab_local,
        total=group_size(group) * vocab_local,
        combine=lambda stats: combine_vocab_stats(stats, group),
    )


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, group, label_smoothing, ignore_index):
        z = logits.float()
        vocab_local = z.shape[-1]
        vocab = vocab_local * group_size(group)
        vocab_start = group_rank(group) * vocab_local

        # softmax is shift invariant: subtract the global max for a stable exp
        logits_max = _global_max_(z.max(dim=-1).values, group)
        z = z - logits_max.unsqueeze(-1)  # new tensor: the caller's logits stay untouched

        local_label = labels - vocab_start
        foreign = (local_label < 0) | (local_label >= vocab_local)  # includes ignore_index
        local_label = local_label.masked_fill(foreign, 0)
        z_label = z.gather(-1, local_label.unsqueeze(-1)).squeeze(-1).masked_fill(foreign, 0.0)

        exp_z = z.exp()
        stats = [z_label, exp_z.sum(dim=-1)]
        if label_smoothing > 0:
            stats.append(z.sum(dim=-1))
        stats = _global_sums_(torch.stack(stats), group)
        log_z = stats[1].log()
        loss = log_z - stats[0]
        if label_smoothing > 0:
            loss = (1.0 - label_smoothing) * loss + label_smoothing * (log_z - stats[2] / vocab)
        ignored = labels == ignore_index
        loss = loss.masked_fill(ignored, 0.0)

        softmax = exp_z.div_(stats[1].unsqueeze(-1))  # reuse the exp buffer
        ctx.save_for_backward(softmax, local_label, foreign, ignored)
        ctx.label_smoothing, ctx.vocab, ctx.in_dtype = label_smoothing, vocab, logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_label, foreign, ignored = ctx.saved_tensors
        eps = ctx.label_smoothing
        grad = softmax  # saved buffer is not needed after this backward
        owned = (~foreign).to(grad.dtype).unsqueeze(-1)
        grad.scatter_add_(-1, local_label.unsqueeze(-1), -(1.0 - eps) * owned)
        if eps > 0:
            grad.sub_(eps / ctx.vocab)
        grad.mul_(grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    group: Optional[Any],
    label_smoothing: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Per-token loss (fp32, shape of ``labels``) from logits split along the last (vocab) dim over ``group``.

    ``logits``: (..., V/T), chunk ``rank`` of the vocab; ``labels``: (...) global token ids. Matches
    ``F.cross_entropy(full_logits, labels, reduction='none', label_smoothing=..., ignore_index=...)``.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on token dims")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    return _VocabParallelCrossEntropy.apply(logits, labels, group, float(label_smoothing), ignore_index)


def fused_head_loss(output: HeadInput, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """fp32 SUM of the token losses of ``output.head(output.hidden)`` without materialising the logits.

    A column-parallel head (vocab split over its tensor group) first lets the hidden states enter the tensor
    region as its own forward would (copy, or all-gather along the sequence under sequence parallelism; the
    backward all-reduces / reduce-scatters the partial d hidden), then the chunked loss all-reduces its per-token
    statistics over the group (`vocab_shard`). Every tensor rank returns the same value.
    """
    head, hidden, shard = output.head, output.hidden, None
    if getattr(head, "bias", None) is not None:
        raise ValueError("the fused head + loss supports an lm_head without bias only")
    if isinstance(head, ColumnParallelLinear):
        if head.input_region:
            hidden = enter_region(hidden, head.group, head.sequence_parallel)
        if group_size(head.group) > 1:
            shard = vocab_shard(head.group, head.weight.shape[0])
    return chunked_linear_cross_entropy(
        hidden, head.weight, labels, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing, shard=shard
    )


def make_loss_fn(pc: ParallelContext, label_smoothing: float = 0.0) -> LossFn:
    """``loss_fn(output, labels)`` -> fp32 SUM of token losses over labels != IGNORE_INDEX (`LossFn`).

    ``output``: the logits, or the `HeadInput` of a chunk with ``fuse_head_loss`` (`fused_head_loss`: no logits
    are materialised). With tp = 1 logits go through ``F.cross_entropy(reduction='sum')``; otherwise they are
    vocab-split (parallel output) and the vocab-parallel cross-entropy is used. Every tensor rank returns the same
    value.
    """

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if isinstance(logits, HeadInput):
            return fused_head_loss(logits, labels, label_smoothing)
        flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        if pc.tp_size == 1:
            return F.cross_entropy(
                flat_logits.float(),
                flat_labels,
                reduction="sum",
                label_smoothing=label_smoothing,
                ignore_index=IGNORE_INDEX,
            )
        return vocab_parallel_cross_entropy(flat_logits, flat_labels, pc.tp_group, label_smoothing).sum()

    return loss_fn


__all__ = [
    "LossFn",
    "combine_vocab_stats",
    "fused_head_loss",
    "make_loss_fn",
    "vocab_parallel_cross_entropy",
    "vocab_shard",
]
