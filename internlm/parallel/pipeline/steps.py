"""The forward and backward step of one micro-batch on one model chunk, shared by every schedule."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from internlm.model import PackedDocs

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss_fn(logits, labels) -> fp32 SUM of token losses`` (labels equal to IGNORE_INDEX take none): what every
schedule calls on the last stage (`internlm.parallel.make_loss_fn` builds one)."""


def chunk_device(model_chunks: List[nn.Module]) -> torch.device:
    """Device of the chunks' parameters: receive buffers and the loss live there."""
    for param in model_chunks[0].parameters():
        return param.device
    raise ValueError("pipeline model chunk has no parameters")


def micro_batch_docs(micro_batch: Dict) -> PackedDocs:
    """The micro-batch's `PackedDocs`: ``micro_batch["docs"]`` when the caller built it (the trainer does, once
    per micro-batch, so every chunk and layer share its sdpa grouping), else a new one from ``cu_seqlens``,
    ``cu_seqlens_list`` and ``max_seqlen`` (the loader's host-side values; absent ones are read back from the
    device when needed)."""
    docs = micro_batch.get("docs")
    if docs is None:
        docs = PackedDocs(micro_batch["cu_seqlens"], micro_batch.get("cu_seqlens_list"), micro_batch.get("max_seqlen"))
    return docs


def forward_step(
    chunk: nn.Module,
    x: torch.Tensor,
    micro_batch: Dict,
    loss_fn: LossFn,
    loss_scale: float,
    is_last_stage: bool,
    loss_total: torch.Tensor,
) -> torch.Tensor:
    """Run ``chunk`` on ``x`` (token ids on the first virtual stage, hidden states elsewhere).

    On the last virtual stage the loss is taken: its unscaled fp32 value is added to ``loss_total`` (in
    place) and ``loss_sum * loss_scale`` is returned for the backward pass; elsewhere the hidden states are.
    """
    out = chunk(
        x,
        cu_seqlens=micro_batch_docs(micro_batch),
        position_ids=micro_batch["position_ids"],
        max_seqlen=micro_batch["max_seqlen"],
    )
    if not is_last_stage:
        return out
    loss_sum = loss_fn(out, micro_batch["labels"])
    loss_total.add_(loss_sum.detach().float())
    return loss_sum * loss_scale


def backward_step(
    x: Optional[torch.Tensor], output: torch.Tensor, output_grad: Optional[torch.Tensor]
) -> Optional[torch.Tensor]:
    """Back-propagate one micro-batch through one chunk; returns the gradient of its input hidden states.

    ``output_grad`` is None on the last virtual stage, whose ``output`` is the scaled loss scalar.
    ``x`` is None on the first virtual stage (token ids have no gradient), and so is the result.
    Parameter gradients accumulate into ``.grad`` across micro-batches, as in a single-process run.
    """
    torch.autograd.backward(output, grad_tensors=output_grad)
    return None if x is None else x.grad


def as_stage_input(received: torch.Tensor, forward_only: bool) -> torch.Tensor:
    """A received activation as the leaf whose ``.grad`` becomes the gradient sent back upstream."""
    return received if forward_only else received.requires_grad_()
