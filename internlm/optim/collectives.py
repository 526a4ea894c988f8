"""The parameter all-gather of the optimizer, bucket by bucket, waited for just before the layers that need it.

After the update each rank has written its fp32 master slice, in the model dtype, into its slice of every
parameter buffer. `ParamGatherer.launch` then all-gathers every bucket (`FlatBuffer.columns`: the same column
range of every slice): each rank sends its ``n / z`` elements of the bucket and receives the other rows, one
``all_gather_into`` (``all_gather_single``: the same call on gloo and NCCL) into a contiguous receive buffer,
which is the bucket's block of the fp32 gradient accumulation tensor viewed as the model dtype. That tensor is
spent after the gradient reduction and not needed before the next backward, so the gather needs no memory of
its own. Completing a gather copies the rows into the strided columns of the parameter buffer and zeroes the
block, ready for the next accumulation.

Buckets are launched in forward order (chunk by chunk; inside a buffer the last columns first, since they hold
the gradients that backward finishes last, i.e. the first layers). Each module that owns managed parameters
gets a forward pre-hook that completes the gathers of the buckets its parameters touch, so the gather of later
buckets overlaps the forward of earlier layers. A parameter read outside its own module's ``forward`` needs
`wait_all` (the optimizer's ``sync_params``) first; a gradient arriving for a buffer whose gathers are still
in flight completes them first (`wait_buffer`).

A group is a ``torch.distributed`` process group, or ``None`` for a dimension of size 1. With one zero1 rank
nothing is gathered and `launch` only zeroes the accumulation tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from internlm.parallel.comm import all_gather_into, group_size

from .flat_buffer import FlatBuffer


@dataclass(eq=False)
class Gather:
    """The all-gather of one bucket of one parameter buffer."""

    buffer: FlatBuffer
    bucket: int
    work: Optional[Any] = None  # async handle while in flight
    received: Optional[torch.Tensor] = None  # contiguous receive buffer, zero1_size rows, while not completed

    @property
    def pending(self) -> bool:
        return self.received is not None

    def receive_buffer(self) -> torch.Tensor:
        """The bucket's block of the accumulation tensor as ``zero1_size * width`` model-dtype elements."""
        block = self.buffer.grad_block(self.bucket)
        dtype = self.buffer.params.dtype
        if dtype == block.dtype:
            return block
        if torch.empty((), dtype=dtype).element_size() > block.element_size():  # wider than fp32: own memory
            return torch.empty(block.numel(), dtype=dtype, device=block.device)
        return block.view(dtype)[: block.numel()]


class ParamGatherer:
    """Launches, tracks and completes the per-bucket parameter all-gathers over ``zero1_group``."""

    def __init__(self, buffers: Sequence[FlatBuffer], zero1_group: Any, chunks: Sequence[nn.Module]) -> None:
        self.buffers = list(buffers)
        self.group = zero1_group
        self.active = group_size(zero1_group) > 1
        order = []
        for position, buffer in enumerate(self.buffers):
            for bucket, (_, end) in enumerate(buffer.columns):
                order.append(((buffer.key.chunk, -end / buffer.shard_numel, position), Gather(buffer, bucket)))
        self.gathers: List[Gather] = [gather for _, gather in sorted(order, key=lambda item: item[0])]
        self._pending: Dict[int, int] = {id(buffer): 0 for buffer in self.buffers}
        self._hooks: List[Any] = []
        if self.active:
            self._register_module_hooks(chunks)

    def _register_module_hooks(self, chunks: Sequence[nn.Module]) -> None:
        rank = {(id(g.buffer), g.bucket): i for i, g in enumerate(self.gathers)}
        owner = {id(slot.param): (buffer, slot) for buffer in self.buffers for slot in buffer.slots}
        seen = set()
        for chunk in chunks:
            for module in chunk.modules():
                if id(module) in seen:
                    continue
                seen.add(id(module))
                needed = set()
                for param in module.parameters(recurse=False):
                    if id(param) in owner:
                        buffer, slot = owner[id(param)]
                        needed.update(rank[(id(buffer), piece.bucket)] for piece in buffer.grad_pieces(slot))
                if needed:
                    gathers = [self.gathers[i] for i in sorted(needed)]
                    self._hooks.append(module.register_forward_pre_hook(self._make_hook(gathers)))

    def _make_hook(self, gathers: List[Gather]):
        def hook(module: nn.Module, args: Any) -> None:
            for gather in gathers:
                if gather.received is not None:
                    self.complete(gather)

        return hook

    @torch.no_grad()
    def launch(self, async_op: bool) -> None:
        """All-gather every bucket (each rank's slice must hold its new values); waits when not ``async_op``."""
        if not self.active:
            for buffer in self.buffers:
                buffer.grads.zero_()
            return
        for gather in self.gathers:
            received = gather.receive_buffer()
            source = gather.buffer.param_shard_block(gather.bucket)
            gather.work = all_gather_into(received, source, self.group, async_op=async_op)
            gather.received = received
            self._pending[id(gather.buffer)] += 1
            if not async_op:
                self.complete(gather)

    @torch.no_grad()
    def complete(self, gather: Gather) -> None:
        """Wait for one gather, copy the received rows into the parameters, zero the accumulation block."""
        if gather.received is None:
            return
        if gather.work is not None:
            gather.work.wait()
        buffer = gather.buffer
        rows = buffer.param_block(gather.bucket)
        rows.copy_(gather.received.view(rows.shape))
        buffer.grad_block(gather.bucket).zero_()
        gather.work = gather.received = None
        self._pending[id(buffer)] -= 1

    def wait_buffer(self, buffer: FlatBuffer) -> None:
        """Complete every gather of ``buffer`` (before a gradient accumulates into its receive buffers)."""
        if self._pending[id(buffer)]:
            for gather in self.gathers:
                if gather.buffer is buffer:
                    self.complete(gather)

    def wait_all(self) -> None:
        for gather in self.gathers:
            self.complete(gather)

    @property
    def pending(self) -> bool:
        """True while a launched gather has not been completed."""
        return any(self._pending.values())

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


__all__ = ["Gather", "ParamGatherer"]
