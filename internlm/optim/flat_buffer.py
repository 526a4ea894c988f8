"""Flat contiguous parameter and gradient buffers, split into equal zero1 slices.

Arrangement of one buffer holding parameters p_0 .. p_{n-1} (all of one dtype and one optimizer class)::

    params (model dtype):  | p_0 | p_1 | ... | p_{n-1} | pad |
    grads  (fp32):         | g_0 | g_1 | ... | g_{n-1} | pad |
                           ^0                  ^numel    ^padded_numel = zero1_size * shard_numel

Parameter i occupies ``[start_i, end_i)`` in both tensors (``end_i - start_i = p_i.numel()``). The padded
length is a multiple of ``zero1_size * ALIGN`` so the buffer splits into ``zero1_size`` equal slices of
``shard_numel`` elements, each starting on an ``ALIGN``-element boundary. Zero1 rank ``z`` owns slice
``[z * shard_numel, (z + 1) * shard_numel)``: it alone keeps the fp32 master copy and AdamW moments of those
elements, updates them, and is the source of that slice in the parameter all-gather. Slice boundaries cut
through parameters freely: ownership is by element, not by tensor. The padding is zero in both tensors
and stays zero (zero gradient, and AdamW with decay maps 0 to 0).

After construction every parameter's ``.data`` is a view into ``params``, so the model reads the gathered
values without a copy. Each slot also carries the parameter's tensor-parallel placement (`TPShard`), which the
checkpoint formats record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
from torch import nn

from internlm.parallel.tp_shard import TPShard

# Slice starts are aligned to 16 elements (64 bytes of fp32, 32 bytes of bf16) for vectorised kernels.
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


class FlatBuffer:
    """Parameters of one ``BufferKey`` as views into a padded flat tensor, plus their fp32 gradient buffer.

    ``entries`` are ``(name, parameter, shard)`` in buffer order.
    """

    def __init__(
        self,
        key: BufferKey,
        entries: Sequence[Tuple[str, nn.Parameter, TPShard]],
        zero1_size: int,
        zero1_rank: int,
    ) -> None:
        if not entries:
            raise ValueError("a FlatBuffer needs at least one parameter")
        self.key = key
        self.zero1_size = zero1_size
        self.zero1_rank = zero1_rank
        self.slots: List[ParamSlot] = []
        offset = 0
        for name, param, shard in entries:
            self.slots.append(ParamSlot(name, param, shard, offset, offset + param.numel()))
            offset += param.numel()
        self.numel = offset
        unit = zero1_size * ALIGN
        self.padded_numel = -(-offset // unit) * unit
        self.shard_numel = self.padded_numel // zero1_size
        self.shard_start = zero1_rank * self.shard_numel
        self.shard_end = self.shard_start + self.shard_numel

        device = entries[0][1].device
        self.params = torch.zeros(self.padded_numel, dtype=key.dtype, device=device)
        self.grads = torch.zeros(self.padded_numel, dtype=torch.float32, device=device)
        with torch.no_grad():
            for slot in self.slots:
                view = self.params[slot.start : slot.end]
                view.copy_(slot.param.detach().reshape(-1))
                slot.param.data = view.view_as(slot.param)

    def param_shard(self) -> torch.Tensor:
        """This rank's slice of the parameter buffer (model dtype)."""
        return self.params[self.shard_start : self.shard_end]

    def grad_shard(self) -> torch.Tensor:
        """This rank's slice of the fp32 gradient buffer."""
        return self.grads[self.shard_start : self.shard_end]

    def grad_view(self, slot: ParamSlot) -> torch.Tensor:
        """The fp32 gradient of one parameter, shaped like the parameter."""
        return self.grads[slot.start : slot.end].view(slot.param.shape)

    def owned_range(self, slot: ParamSlot) -> Tuple[int, int]:
        """Part of ``slot`` inside this rank's slice, in buffer coordinates (empty as (s, s))."""
        start = min(max(slot.start, self.shard_start), self.shard_end)
        end = max(min(slot.end, self.shard_end), start)
        return start, end


__all__ = ["ALIGN", "BufferKey", "ParamSlot", "FlatBuffer"]
