"""Flat contiguous parameter and gradient buffers, split into equal zero1 slices and cut into buckets.

Arrangement of one buffer holding parameters p_0 .. p_{n-1} (all of one dtype and one optimizer class)::

    params (model dtype):  | p_0 | p_1 | ... | p_{n-1} | pad |
                           ^0                  ^numel    ^padded_numel = zero1_size * shard_numel

Parameter i occupies ``[start_i, end_i)`` (``end_i - start_i = p_i.numel()``). The padded length is a multiple
of ``zero1_size * ALIGN`` so the buffer splits into ``zero1_size`` equal slices of ``shard_numel`` elements,
each starting on an ``ALIGN``-element boundary. Zero1 rank ``z`` owns slice ``[z * shard_numel, (z + 1) *
shard_numel)``: it alone keeps the fp32 master copy and AdamW moments of those elements, updates them, and is
the source of that slice in the parameter all-gather. Slice boundaries cut through parameters freely:
ownership is by element, not by tensor. The padding is zero and stays zero.

**Buckets.** Seen as a ``(zero1_size, shard_numel)`` matrix (row z = slice z), the buffer is cut into column
ranges ``columns[b] = [c0, c1)``: bucket ``b`` is the same range of every slice, so it splits evenly into
zero1 pieces and one reduce-scatter gives each rank the sum of exactly its own piece (and one all-gather
fills the piece of every rank). Columns are multiples of ``ALIGN`` wide.

**Lanes.** The entries arrive in the order their gradients become final (reverse registration order). A
bucket is ready when its piece of *every* slice is, so for buckets to become ready progressively during
backward every slice must fill in that order. The parameters are therefore dealt into ``zero1_size`` lanes
(`lane_order`), each lane keeps ready order, and lane k is laid out as (roughly) slice k. Column ``c`` of every
slice then holds gradients that are final after about a fraction ``c / shard_numel`` of backward, and forward
needs the last columns first. A parameter wider than a bucket holds back every bucket its columns cover until
it is final (with one owner per element, at least ``zero1_size`` times its size of reduce-scatter follows its
gradient).

**Gradient storage.** ``grads`` is the fp32 accumulation buffer, stored *bucket-major*: bucket b's block
``grads[zero1_size * c0 : zero1_size * c1]`` is contiguous, row z of it being slice z's columns ``[c0, c1)``
— exactly the input layout of a reduce-scatter. A parameter's gradient is therefore a list of
`GradPiece` ranges (split where it crosses a column cut or a slice boundary). ``grad_shard()`` is the
reduced gradient of this rank's slice in slice order (a separate ``shard_numel`` fp32 tensor when
``zero1_size > 1``, the accumulation buffer itself otherwise). With one slice the storage is the plain order.

After construction every parameter's ``.data`` is a view into ``params``, so the model reads the gathered
values without a copy. Each slot also carries the parameter's tensor-parallel placement (`TPShard`), which the
checkpoint formats record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from internlm.parallel.tp_shard import TPShard

# Slice starts and bucket columns are aligned to 16 elements (64 bytes of fp32, 32 bytes of bf16).
ALIGN = 16


@dataclass(frozen=True)
class BufferKey:
    """What the parameters sharing one buffer have in common."""

    chunk: int  # index of the model chunk (pipeline virtual stage) holding them
    dtype: torch.dtype  # model dtype of the parameters
    decay: bool  # weight decay applies (matrices and embeddings) or not (norm weights, biases)
    tp_duplicate: bool  # same values on every tensor rank: count once in the grad norm (`TPShard.duplicate`)
    tp_partial_grad: bool  # gradient must be summed over the tensor group (`TPShard.partial_grad`)


@dataclass
class ParamSlot:
    """One parameter's place in a buffer, elements ``[start, end)``, and its tensor-parallel placement."""

    name: str
    param: nn.Parameter
    shard: TPShard
    start: int
    end: int


@dataclass(frozen=True)
class GradPiece:
    """Elements ``[lo, hi)`` of a flattened parameter: they lie in one bucket and are stored contiguously in the
    accumulation buffer from ``grads[dest]``."""

    lo: int
    hi: int
    dest: int
    bucket: int


def lane_order(sizes: Sequence[int], lanes: int, lane_numel: int) -> List[int]:
    """Order of parameters (``sizes`` in gradient-ready order) that makes every slice fill in ready order.

    Lanes are filled largest parameter first (LPT scheduling, so lanes end up within about one small parameter
    of each other): each joins the least-filled lane (lowest index on ties) among those with room for it; the
    last lane takes anything. Equal-sized parameters (the same matrix of every layer) are dealt round-robin, so
    every lane spans the whole backward pass. No lane but the last exceeds ``lane_numel``, so lane k starts at
    or before slice k: the lanes before it left ``k * lane_numel - start`` elements of slice k-1 free. Lane k
    fills that room with its latest-ready parameters that fit (late columns are waited for late anyway), then
    continues in ready order from its earliest parameter, which thus starts slice k (possibly straddling into
    it from the end of slice k-1). Returns lane 0's indices, then lane 1's, ...
    """
    fills = [0] * lanes
    members: List[List[int]] = [[] for _ in range(lanes)]
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], -i)):
        size = sizes[index]
        fits = [k for k in range(lanes - 1) if fills[k] + size <= lane_numel] + [lanes - 1]
        best = min(fits, key=lambda k: (fills[k], k))
        fills[best] += size
        members[best].append(index)
    order: List[int] = []
    start = 0
    for k, lane in enumerate(members):
        lane = sorted(lane)
        room = max(0, k * lane_numel - start)
        late = []
        for index in reversed(lane):
            if sizes[index] <= room:
                late.append(index)
                room -= sizes[index]
        taken = set(late)
        order += sorted(late) + [index for index in lane if index not in taken]
        start += fills[k]
    return order


class FlatBuffer:
    """Parameters of one ``BufferKey`` as views into a padded flat tensor, plus their fp32 gradient buffers.

    ``entries`` are ``(name, parameter, shard)`` in gradient-ready order; with ``zero1_size > 1`` they are
    reordered into lanes (`lane_order`). ``bucket_numel`` is the target number of elements of one bucket over
    all slices (``<= 0``: one bucket).
    """

    def __init__(
        self,
        key: BufferKey,
        entries: Sequence[Tuple[str, nn.Parameter, TPShard]],
        zero1_size: int,
        zero1_rank: int,
        bucket_numel: int = 0,
    ) -> None:
        if not entries:
            raise ValueError("a FlatBuffer needs at least one parameter")
        self.key = key
        self.zero1_size = zero1_size
        self.zero1_rank = zero1_rank
        self.numel = sum(param.numel() for _, param, _ in entries)
        unit = zero1_size * ALIGN
        self.padded_numel = -(-self.numel // unit) * unit
        self.shard_numel = self.padded_numel // zero1_size
        self.shard_start = zero1_rank * self.shard_numel
        self.shard_end = self.shard_start + self.shard_numel

        order = range(len(entries))
        if zero1_size > 1:
            order = lane_order([param.numel() for _, param, _ in entries], zero1_size, self.shard_numel)
        self.slots: List[ParamSlot] = []
        offset = 0
        for index in order:
            name, param, shard = entries[index]
            self.slots.append(ParamSlot(name, param, shard, offset, offset + param.numel()))
            offset += param.numel()

        width = self.shard_numel
        if bucket_numel > 0:
            width = min(self.shard_numel, max(ALIGN, -(-bucket_numel // (zero1_size * ALIGN)) * ALIGN))
        self._width = width
        self.columns: List[Tuple[int, int]] = [
            (c, min(c + width, self.shard_numel)) for c in range(0, self.shard_numel, width)
        ]

        device = entries[0][1].device
        self.params = torch.zeros(self.padded_numel, dtype=key.dtype, device=device)
        self.grads = torch.zeros(self.padded_numel, dtype=torch.float32, device=device)
        self._grad_shard = (
            self.grads if zero1_size == 1 else torch.zeros(self.shard_numel, dtype=torch.float32, device=device)
        )
        with torch.no_grad():
            for slot in self.slots:
                view = self.params[slot.start : slot.end]
                view.copy_(slot.param.detach().reshape(-1))
                slot.param.data = view.view_as(slot.param)
        self._pieces: Dict[int, List[GradPiece]] = {id(slot): self._cut(slot) for slot in self.slots}

    def _cut(self, slot: ParamSlot) -> List[GradPiece]:
        pieces = []
        position, rows = slot.start, self.zero1_size
        while position < slot.end:
            row, column = divmod(position, self.shard_numel)
            bucket = column // self._width
            c0, c1 = self.columns[bucket]
            stop = min(slot.end, row * self.shard_numel + c1)
            dest = rows * c0 + row * (c1 - c0) + column - c0
            pieces.append(GradPiece(position - slot.start, stop - slot.start, dest, bucket))
            position = stop
        return pieces

    # ------------------------------------------------------------------ parameters
    def param_shard(self) -> torch.Tensor:
        """This rank's slice of the parameter buffer (model dtype)."""
        return self.params[self.shard_start : self.shard_end]

    def param_shard_block(self, bucket: int) -> torch.Tensor:
        """This rank's piece of ``bucket`` in the parameter buffer (contiguous)."""
        c0, c1 = self.columns[bucket]
        return self.params[self.shard_start + c0 : self.shard_start + c1]

    def param_block(self, bucket: int) -> torch.Tensor:
        """``bucket`` of the parameter buffer as a strided ``(zero1_size, width)`` view, row z = slice z."""
        c0, c1 = self.columns[bucket]
        return self.params.view(self.zero1_size, self.shard_numel)[:, c0:c1]

    # ------------------------------------------------------------------ gradients
    def grad_shard(self) -> torch.Tensor:
        """The reduced fp32 gradient of this rank's slice, in slice order (AdamW's ``master.grad``)."""
        return self._grad_shard

    def grad_shard_block(self, bucket: int) -> torch.Tensor:
        """``bucket``'s columns of `grad_shard` (the output of its reduce-scatter)."""
        c0, c1 = self.columns[bucket]
        return self._grad_shard[c0:c1]

    def grad_block(self, bucket: int) -> torch.Tensor:
        """``bucket`` of the accumulation buffer: contiguous, ``zero1_size`` rows of its width, row z = slice z."""
        c0, c1 = self.columns[bucket]
        return self.grads[self.zero1_size * c0 : self.zero1_size * c1]

    def grad_pieces(self, slot: ParamSlot) -> List[GradPiece]:
        """Where the flattened gradient of ``slot`` accumulates in ``grads``, bucket by bucket."""
        return self._pieces[id(slot)]

    def owned_range(self, slot: ParamSlot) -> Tuple[int, int]:
        """Part of ``slot`` inside this rank's slice, in buffer coordinates (empty as (s, s))."""
        start = min(max(slot.start, self.shard_start), self.shard_end)
        end = max(min(slot.end, self.shard_end), start)
        return start, end


__all__ = ["ALIGN", "BufferKey", "ParamSlot", "GradPiece", "FlatBuffer", "lane_order"]
