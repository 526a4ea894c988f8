"""Packing: a window of the token stream becomes a training sequence; sequences become a micro-batch.

A sequence starting at stream position ``t`` with length ``L`` reads tokens ``x = stream[t : t + L + 1]``:

* ``input_ids[i] = x[i]``, ``labels[i] = x[i + 1]`` for ``i < L``;
* ``labels[i] = -100`` where token ``t + i`` is the last token (EOS) of its document: no prediction
  crosses a document boundary; the last label is also ``-100`` when ``x`` has only ``L`` tokens
  (the window ends the data);
* the window splits into *pieces* at document ends: ``cu_seqlens = [0, e_1 - t, ..., L]``;
* ``position_ids[i] = i - (start of the piece holding i)``: 0 at every piece start, the window's first
  piece included (even when it continues a document that began before the window).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Union

import numpy as np
import torch

from internlm.labels import IGNORE_INDEX


@dataclass
class PackedSequence:
    input_ids: np.ndarray  # int64 (L,)
    labels: np.ndarray  # int64 (L,)
    cu_seqlens: np.ndarray  # int32 (pieces + 1,), from 0 to L
    position_ids: np.ndarray  # int64 (L,)


def pack_window(tokens: np.ndarray, doc_ends: np.ndarray, seq_len: int) -> PackedSequence:
    """Build one sequence from ``tokens`` (``seq_len + 1`` or ``seq_len`` stream tokens from ``t``).

    ``doc_ends`` are the document ends ``e`` with ``t < e <= t + seq_len`` made relative to ``t``
    (so values in ``(0, seq_len]``); a value ``k`` means token ``t + k - 1`` ends its document.
    """
    if tokens.size not in (seq_len, seq_len + 1):
        raise ValueError(
            f"a window of seq_len={seq_len} needs {seq_len + 1} tokens (or {seq_len} at the end), got {tokens.size}"
        )
    ends = np.asarray(doc_ends, dtype=np.int64)
    if ends.size and (ends.min() <= 0 or ends.max() > seq_len):
        raise ValueError(f"document ends {ends.tolist()} must lie in (0, {seq_len}]")
    input_ids = tokens[:seq_len].astype(np.int64)
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    labels[: tokens.size - 1] = tokens[1:]
    labels[ends - 1] = IGNORE_INDEX
    cuts = ends[ends < seq_len]
    cu_seqlens = np.concatenate([[0], cuts, [seq_len]]).astype(np.int32)
    lengths = np.diff(cu_seqlens)
    position_ids = np.arange(seq_len, dtype=np.int64) - np.repeat(cu_seqlens[:-1].astype(np.int64), lengths)
    return PackedSequence(input_ids, labels, cu_seqlens, position_ids)


def window_label_tokens(doc_ends: np.ndarray, seq_len: int, num_tokens: int) -> int:
    """The number of labels other than ``IGNORE_INDEX`` of the sequence `pack_window` builds from ``num_tokens``
    (``seq_len + 1``, or ``seq_len`` at the end of the data) tokens with these relative ``doc_ends``, from the
    document boundaries alone (no tokens read): one label is dropped per document end, plus the last one when
    the window has no next token."""
    ends = np.asarray(doc_ends)
    ignored = int(ends.size)
    if num_tokens <= seq_len and not (ends.size and int(ends[-1]) == seq_len):
        ignored += 1
    return seq_len - ignored


def padding_sequence(seq_len: int) -> PackedSequence:
    """A filler sequence that takes no loss: EOS-free zeros, one piece, every label ``-100``."""
    return PackedSequence(
        np.zeros(seq_len, np.int64),
        np.full(seq_len, IGNORE_INDEX, np.int64),
        np.array([0, seq_len], np.int32),
        np.arange(seq_len, dtype=np.int64),
    )


def collate(sequences: Sequence[PackedSequence]) -> Dict[str, Union[torch.Tensor, int]]:
    """Lay ``micro_bsz`` sequences end to end into the micro-batch dict of docs/architecture.md.

    ``cu_seqlens`` holds every piece boundary shifted by ``j * seq_len`` for sequence ``j``, so every
    multiple of ``seq_len`` is a boundary; ``max_seqlen`` is the longest piece. The host-side values
    ``cu_seqlens_list`` (``cu_seqlens`` as a Python list) and ``label_tokens`` (labels other than
    ``IGNORE_INDEX``, an int) are computed here, on the CPU, so that the training step never reads a
    tensor back from the device for them.
    """
    if not sequences:
        raise ValueError("collate needs at least one sequence")
    seq_len = sequences[0].input_ids.size
    cu: List[np.ndarray] = [np.zeros(1, np.int32)]
    for j, s in enumerate(sequences):
        if s.input_ids.size != seq_len:
            raise ValueError(f"sequence {j} has length {s.input_ids.size}, expected {seq_len}")
        cu.append(s.cu_seqlens[1:] + np.int32(j * seq_len))
    cu_seqlens = np.concatenate(cu)
    labels = np.concatenate([s.labels for s in sequences])
    return {
        "input_ids": torch.from_numpy(np.concatenate([s.input_ids for s in sequences])).view(1, -1),
        "labels": torch.from_numpy(labels).view(1, -1),
        "cu_seqlens": torch.from_numpy(cu_seqlens.astype(np.int32)),
        "position_ids": torch.from_numpy(np.concatenate([s.position_ids for s in sequences])).view(1, -1),
        "max_seqlen": int(np.diff(cu_seqlens).max()),
        # host-side values, so that no step has to read them back from the device
        "cu_seqlens_list": cu_seqlens.tolist(),
        "label_tokens": int(np.count_nonzero(labels != IGNORE_INDEX)),
    }
