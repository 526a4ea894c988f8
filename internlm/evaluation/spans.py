"""Requests as scored spans, packed into micro-batches of the trainer's shape, and the loss that scores them.

A span is one token sequence whose labelled tokens are scored together: a multiple-choice request (context +
choice; only the choice's tokens are labelled) or one window of a perplexity text. Spans are packed first-fit, in
order, into rows of ``seq_len`` tokens, each span its own document (``cu_seqlens`` piece, positions from 0), so
no span attends to another; ``micro_bsz`` rows make a micro-batch of exactly the training shape, which the
pipeline's stage-to-stage messages require. Micro-batch ``m`` goes to data-parallel rank ``m % dp_size``.

`SpanLoss` is the ``loss_fn`` the schedule calls on the last stage: it takes the per-token negative
log-likelihood (no label smoothing; the vocab-parallel cross-entropy under tensor parallelism) and adds it into
its span's slot: ``values[s] = sum over span s's labelled tokens t of -log p(t | prefix)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from internlm.labels import IGNORE_INDEX
from internlm.model.modeling import HeadInput
from internlm.parallel.cross_entropy import vocab_parallel_cross_entropy


@dataclass(frozen=True)
class Span:
    """``input_ids`` and ``labels`` (IGNORE_INDEX where not scored) of equal length, at most seq_len."""

    input_ids: Tuple[int, ...]
    labels: Tuple[int, ...]


def choice_span(context: List[int], continuation: List[int], seq_len: int, where: str) -> Span:
    """The span scoring ``continuation`` after ``context``; the context is cut from the left to fit seq_len."""
    if not continuation:
        raise ValueError(f"{where}: a choice encodes to no token")
    if len(continuation) > seq_len:
        raise ValueError(f"{where}: a choice of {len(continuation)} tokens does not fit seq_len {seq_len}")
    tokens = (context + continuation)[-(seq_len + 1) :]
    inputs = tokens[:-1]
    labels = [IGNORE_INDEX] * (len(inputs) - len(continuation)) + continuation
    return Span(tuple(inputs), tuple(labels))


def text_spans(tokens: List[int], eos_id: int, seq_len: int) -> List[Span]:
    """Non-overlapping windows scoring every token of a text, the first predicted from EOS (a document start)."""
    seq = [eos_id] + tokens
    windows = [seq[a : a + seq_len + 1] for a in range(0, len(seq) - 1, seq_len)]
    return [Span(tuple(w[:-1]), tuple(w[1:])) for w in windows]


@dataclass
class PackedBatches:
    """This rank's micro-batches (host tensors in the loader's format, plus ``span_ids``: the span of each token,
    ``num_spans`` where none) and the number of spans over all ranks."""

    batches: List[Dict[str, Any]]
    num_spans: int


def _micro_batch(rows: List[List[Tuple[int, Span]]], seq_len: int, num_spans: int) -> Dict[str, Any]:
    n = len(rows) * seq_len
    input_ids = np.zeros(n, np.int64)
    labels = np.full(n, IGNORE_INDEX, np.int64)
    position_ids = np.zeros(n, np.int64)
    span_ids = np.full(n, num_spans, np.int64)
    cu = [0]
    for r, row in enumerate(rows):
        at = r * seq_len
        for index, span in row:
            length = len(span.input_ids)
            input_ids[at : at + length] = span.input_ids
            labels[at : at + length] = span.labels
            position_ids[at : at + length] = np.arange(length)
            span_ids[at : at + length] = index
            at += length
            cu.append(at)
        end = (r + 1) * seq_len
        if at < end:  # the rest of the row: one loss-free piece
            position_ids[at:end] = np.arange(end - at)
            cu.append(end)
    cu_seqlens = np.asarray(cu, np.int32)
    return {
        "input_ids": torch.from_numpy(input_ids).view(1, -1),
        "labels": torch.from_numpy(labels).view(1, -1),
        "cu_seqlens": torch.from_numpy(cu_seqlens),
        "position_ids": torch.from_numpy(position_ids).view(1, -1),
        "max_seqlen": int(np.diff(cu_seqlens).max()),
        "cu_seqlens_list": cu_seqlens.tolist(),
        "label_tokens": int(np.count_nonzero(labels != IGNORE_INDEX)),
        "span_ids": torch.from_numpy(span_ids),
    }


def pack_spans(spans: Sequence[Span], seq_len: int, micro_bsz: int, dp_rank: int, dp_size: int) -> PackedBatches:
    """Pack ``spans`` (see the module docstring) and keep this data-parallel rank's micro-batches."""
    rows: List[List[Tuple[int, Span]]] = []
    used = seq_len  # no open row yet
    for index, span in enumerate(spans):
        if len(span.input_ids) > seq_len:
            raise ValueError(f"span {index} of {len(span.input_ids)} tokens exceeds seq_len {seq_len}")
        if used + len(span.input_ids) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((index, span))
        used += len(span.input_ids)
    groups = [rows[a : a + micro_bsz] for a in range(0, len(rows), micro_bsz)]
    if groups and len(groups[-1]) < micro_bsz:
        groups[-1] = groups[-1] + [[] for _ in range(micro_bsz - len(groups[-1]))]
    mine = [g for m, g in enumerate(groups) if m % dp_size == dp_rank]
    return PackedBatches([_micro_batch(g, seq_len, len(spans)) for g in mine], len(spans))


def padding_batch(like: Dict[str, Any], num_spans: int) -> Dict[str, Any]:
    """A loss-free copy of a micro-batch (the interleaved schedule runs micro-batches in groups of pp_size)."""
    labels = torch.full_like(like["labels"], IGNORE_INDEX)
    return dict(like, labels=labels, span_ids=torch.full_like(like["span_ids"], num_spans), label_tokens=0)


class SpanLoss:
    """The schedule's ``loss_fn`` during evaluation: per-span summed negative log-likelihood into ``values``
    (a device vector of ``num_spans`` + 1 slots, the last collecting unscored tokens). ``batches``: the device
    micro-batches the schedule runs, each recognised by its ``labels`` tensor; ``tp_group``: the tensor group when
    the logits are vocab-split (tp > 1), else None."""

    def __init__(self, batches: List[Dict[str, Any]], num_spans: int, device: torch.device, tp_group: Optional[Any]):
        self.values = torch.zeros(num_spans + 1, dtype=torch.float64, device=device)
        self.span_ids = {id(mb["labels"]): mb["span_ids"] for mb in batches}
        self.tp_group = tp_group

    def __call__(self, output: Any, labels: torch.Tensor) -> torch.Tensor:
        span_ids = self.span_ids.get(id(labels))
        if span_ids is None:
            raise RuntimeError("evaluation: the schedule gave the loss labels of no evaluation micro-batch")
        logits = output.logits() if isinstance(output, HeadInput) else output
        flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        if self.tp_group is None:
            nll = F.cross_entropy(flat_logits.float(), flat_labels, reduction="none", ignore_index=IGNORE_INDEX)
        else:
            nll = vocab_parallel_cross_entropy(flat_logits, flat_labels, self.tp_group)
        nll = nll.double().masked_fill(flat_labels == IGNORE_INDEX, 0.0)
        self.values.index_add_(0, span_ids.to(nll.device), nll)
        return nll.sum().float()


__all__ = ["PackedBatches", "Span", "SpanLoss", "choice_span", "pack_spans", "padding_batch", "text_spans"]
