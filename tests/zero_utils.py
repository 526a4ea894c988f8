"""Shared helpers of the hybrid ZeRO tests (tests/optim) and the tests that train with the optimizer directly
(tests/checkpoint, tests/train): a tiny model, its global batches and training loop, the single-process torch
AdamW + clip reference, contexts of real gloo groups, and a tensor-parallel toy model (`Quadratic`)."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, Dict, List, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from internlm.labels import IGNORE_INDEX
from internlm.model import InternLM, InternLMConfig
from internlm.optim import HybridZeroOptimizer
from internlm.parallel.tp_shard import TPShard, declare_shards

VOCAB, SEQ, GLOBAL_BSZ = 64, 8, 8
HYPER = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, clip_grad_norm=0.5)


def tiny_model(dtype: torch.dtype = torch.float32) -> InternLM:
    config = InternLMConfig(
        hidden_size=32,
        num_layers=1,
        num_attention_heads=2,
        vocab_size=VOCAB,
        multiple_of=16,
        attn_backend="sdpa",
        dtype=dtype,
    )
    model = InternLM(config)
    # The exact gradient of k_proj.bias is zero (softmax ignores a shift shared by all keys), so autograd
    # returns rounding noise that Adam rescales to full-size steps: freeze it so trajectories are comparable.
    model.layers["0"].self_attn.k_proj.bias.requires_grad_(False)
    return model


def single_context(tp_rank: int = 0, tp_size: int = 1) -> SimpleNamespace:
    """One process's context (no groups). With ``tp_size`` > 1: tensor rank ``tp_rank`` without a tensor group,
    enough to build and step shards (the tensor-group sum of partial gradients is skipped)."""
    return SimpleNamespace(
        dp_size=1,
        dp_rank=0,
        dp_group=None,
        zero1_size=1,
        zero1_rank=0,
        zero1_group=None,
        tp_size=tp_size,
        tp_rank=tp_rank,
        tp_group=None,
        pp_size=1,
        pp_group=None,
    )


def global_batch(step: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random tokens and labels; about a quarter of the labels are -100 so ranks see unequal token counts."""
    gen = torch.Generator().manual_seed(1234 + step)
    ids = torch.randint(0, VOCAB, (GLOBAL_BSZ, SEQ), generator=gen)
    labels = torch.randint(0, VOCAB, (GLOBAL_BSZ, SEQ), generator=gen)
    labels[torch.rand(GLOBAL_BSZ, SEQ, generator=gen) < 0.25] = IGNORE_INDEX
    return ids, labels


def backward_step(model, step: int, dp_rank: int, dp_size: int, micro_num: int, loss_scale: float = 1.0) -> None:
    """This rank's micro-batches of global batch ``step``; each backward of loss_sum / global_tokens."""
    ids, labels = global_batch(step)
    global_tokens = int((labels != IGNORE_INDEX).sum())  # what the all-reduce of per-rank token counts gives
    rows = GLOBAL_BSZ // dp_size
    ids, labels = ids[dp_rank * rows : (dp_rank + 1) * rows], labels[dp_rank * rows : (dp_rank + 1) * rows]
    for mb_ids, mb_labels in zip(ids.chunk(micro_num), labels.chunk(micro_num)):
        logits = model(mb_ids).float()
        loss = F.cross_entropy(
            logits.reshape(-1, VOCAB), mb_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        (loss * loss_scale / global_tokens).backward()


def train_zero(model, opt: HybridZeroOptimizer, steps: range, dp_rank=0, dp_size=1, micro_num=2) -> List[float]:
    norms = []
    for step in steps:
        opt.begin_step(micro_num)
        backward_step(model, step, dp_rank, dp_size, micro_num)
        norm, skipped = opt.step()  # device tensors
        assert not skipped
        norms.append(float(norm))
    opt.sync_params()
    return norms


def reference_run(steps: int, micro_num: int = 2) -> Tuple[Dict[str, torch.Tensor], List[float]]:
    """Plain torch: AdamW with decay on >=2-D parameters only, clip_grad_norm_."""
    model = tiny_model()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": HYPER["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=HYPER["lr"],
        betas=HYPER["betas"],
        eps=HYPER["eps"],
    )
    norms = []
    for step in range(steps):
        opt.zero_grad()
        backward_step(model, step, 0, 1, micro_num)
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), HYPER["clip_grad_norm"])))
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, norms


def max_rel_error(params: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]) -> float:
    """Largest over parameters of max|a - b| / max|b|."""
    assert params.keys() == ref.keys()
    return max(float((params[n].float() - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-12)) for n in ref)


def update_rel_error(
    params: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor], init: Dict[str, torch.Tensor]
) -> float:
    """||(params - init) - (ref - init)|| / ||ref - init|| over the whole model: how far two runs moved apart
    relative to how far training moved (1.0 for a run that never updated)."""
    num = sum(float((params[n].float() - ref[n]).square().sum()) for n in ref)
    den = sum(float((ref[n] - init[n]).square().sum()) for n in ref)
    return math.sqrt(num / den)


def snapshot(model) -> Dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def make_opt(model, pc=None, **overrides) -> HybridZeroOptimizer:
    kwargs = dict(HYPER, reduce_bucket_size=16 * 1024)  # several buckets for the tiny model
    kwargs.update(overrides)
    return HybridZeroOptimizer([model], pc or single_context(), **kwargs)


# ---------------------------------------------------------------------- tests


def make_context(rank: int, world: int, tp_size: int, zero1_size: int) -> SimpleNamespace:
    """Groups for rank = tp_rank + tp_size * dp_rank (pp = 1); zero1 groups are consecutive dp blocks, zero1
    replica groups the dp ranks with the same zero1 rank."""
    dp_size = world // tp_size
    tp_rank, dp_rank = rank % tp_size, rank // tp_size
    found: Dict[str, Any] = {}

    def new_group(kind: str, ranks: List[int]) -> None:
        group = dist.new_group(ranks)  # every rank creates every group, in the same order
        if rank in ranks:
            found[kind] = group if len(ranks) > 1 else None

    for d in range(dp_size):
        new_group("tp", [t + tp_size * d for t in range(tp_size)])
    for t in range(tp_size):
        new_group("dp", [t + tp_size * d for d in range(dp_size)])
        for block in range(dp_size // zero1_size):
            new_group("zero1", [t + tp_size * (block * zero1_size + j) for j in range(zero1_size)])
        for j in range(zero1_size):
            new_group("zero1_replica", [t + tp_size * (b * zero1_size + j) for b in range(dp_size // zero1_size)])
    return SimpleNamespace(
        dp_size=dp_size,
        dp_rank=dp_rank,
        dp_group=found["dp"],
        zero1_size=zero1_size,
        zero1_rank=dp_rank % zero1_size,
        zero1_group=found["zero1"],
        zero1_replica_group=found["zero1_replica"],
        tp_size=tp_size,
        tp_rank=tp_rank,
        tp_group=found["tp"],
        pp_size=1,
        pp_group=None,
    )


ROWS, OUT, IN = 8, 8, 6
PARTIAL_WEIGHTS = (0.25, 0.75)  # tp rank r computes this fraction of the g term: partial gradients


class Quadratic(nn.Module):
    """Loss 0.5 * mean over rows of ||W - A_i||^2 + ||b - C_i||^2 + ||g - E_i||^2 (W: matrix with decay)."""

    def __init__(self, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        full = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(7))
        self.weight = nn.Parameter(full.chunk(tp_size, 0)[tp_rank].clone())
        self.bias = nn.Parameter(torch.zeros(IN))
        self.gain = nn.Parameter(torch.ones(IN))
        self.tp_rank, self.tp_size = tp_rank, tp_size
        if tp_size > 1:
            declare_shards(
                self,
                weight=TPShard.split((OUT, IN), dim=0, rank=tp_rank, size=tp_size),
                bias=TPShard.replicated((IN,), rank=tp_rank, size=tp_size),
                gain=TPShard.replicated((IN,), rank=tp_rank, size=tp_size, partial_grad=True),
            )

    def forward(self, step: int, dp_rank: int = 0, dp_size: int = 1) -> torch.Tensor:
        """This dp rank's rows of batch ``step``; called as ``model(...)`` so the optimizer's pre-hook waits for
        the parameter all-gather of the previous step."""
        gen = torch.Generator().manual_seed(100 + step)
        a = torch.randn(ROWS, OUT, IN, generator=gen)
        c, e = torch.randn(ROWS, IN, generator=gen), torch.randn(ROWS, IN, generator=gen)
        rows = slice(dp_rank * ROWS // dp_size, (dp_rank + 1) * ROWS // dp_size)
        a = a.chunk(self.tp_size, 1)[self.tp_rank]
        share = PARTIAL_WEIGHTS[self.tp_rank] if self.tp_size > 1 else 1.0
        total = (self.weight - a[rows]).square().sum() + (self.bias - c[rows]).square().sum()
        total = total + share * (self.gain - e[rows]).square().sum()
        return 0.5 * total / ROWS
