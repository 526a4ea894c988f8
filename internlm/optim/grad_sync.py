"""Gradient accumulation into the fp32 flat buffers and bucketed data-parallel reduction.

Every managed parameter gets a post-accumulate-grad hook. When autograd has produced ``param.grad`` the hook
adds it (cast to fp32) into the parameter's range of its buffer's gradient tensor and drops ``param.grad``,
so micro-batch accumulation happens in fp32 whatever the model dtype, and no second gradient copy lives.

Buckets are contiguous ranges ``[start, end)`` of one gradient buffer, cut at parameter boundaries once a
range reaches ``bucket_bytes`` of fp32; the last bucket of a buffer also covers its padding. Buffers list
parameters in reverse registration order, which is roughly the order backward finishes them, so buckets
fill front to back. ``begin_step(n)`` arms the counting: a parameter is final after its n-th gradient, and a
bucket is ready once all its parameters are final. With ``overlap`` a ready bucket's all-reduce (SUM over the
data-parallel group: 4 bytes per element sent and received, times about 2 (dp - 1) / dp on a ring) is
launched asynchronously from inside backward; otherwise, and for buckets that never became ready, it is
launched in ``finish()``. The loss is already normalised by the global token count, so the sum is the
gradient of the global loss (see docs/architecture.md, "Loss normalisation").

Every data-parallel rank must launch the buckets in the same order; this holds when all ranks run the same
backward graph, as in InternLM training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from internlm.parallel.comm import all_reduce_

from .flat_buffer import FlatBuffer, ParamSlot


@dataclass
class Bucket:
    """A range of one gradient buffer reduced by a single all-reduce."""

    buffer: FlatBuffer
    start: int
    end: int
    num_params: int
    pending: int = 0  # parameters not yet final in the current step
    work: Optional[Any] = None  # async handle while the all-reduce is in flight
    launched: bool = False

    def grads(self) -> torch.Tensor:
        return self.buffer.grads[self.start : self.end]


@dataclass
class _Entry:
    buffer: FlatBuffer
    slot: ParamSlot
    bucket: Bucket
    count: int = 0


def build_buckets(buffer: FlatBuffer, bucket_bytes: int) -> List[Bucket]:
    """Split ``buffer`` at parameter boundaries into ranges of at least ``bucket_bytes`` of fp32 (the last may be
    smaller)."""
    limit = max(1, bucket_bytes // 4)
    buckets: List[Bucket] = []
    start, count = 0, 0
    for i, slot in enumerate(buffer.slots):
        count += 1
        last = i == len(buffer.slots) - 1
        if last or slot.end - start >= limit:
            end = buffer.padded_numel if last else slot.end
            buckets.append(Bucket(buffer, start, end, count))
            start, count = end, 0
    return buckets


class GradReducer:
    """Owns the gradient hooks and the bucket all-reduces over ``dp_group`` (and ``tp_group`` for partial grads)."""

    def __init__(
        self,
        buffers: Sequence[FlatBuffer],
        dp_group: Any,
        tp_group: Any,
        bucket_bytes: int,
        overlap: bool,
    ) -> None:
        self.buffers = list(buffers)
        self.dp_group = dp_group
        self.tp_group = tp_group
        self.overlap = overlap
        self.num_micro_batches: Optional[int] = None
        self.buckets: List[Bucket] = []
        self._entries: Dict[int, _Entry] = {}
        for buffer in self.buffers:
            buckets = build_buckets(buffer, bucket_bytes)
            self.buckets.extend(buckets)
            slots = iter(buffer.slots)
            for bucket in buckets:
                for _ in range(bucket.num_params):
                    slot = next(slots)
                    self._entries[id(slot.param)] = _Entry(buffer, slot, bucket)
        self._hooks = [
            entry.slot.param.register_post_accumulate_grad_hook(self._on_grad) for entry in self._entries.values()
        ]

    # ------------------------------------------------------------------ hooks
    @torch.no_grad()
    def _on_grad(self, param: nn.Parameter) -> None:
        entry = self._entries[id(param)]
        entry.buffer.grad_view(entry.slot).add_(param.grad)
        param.grad = None
        if self.num_micro_batches is None:  # not armed: plain accumulation, reduced at step time
            return
        entry.count += 1
        if entry.count > self.num_micro_batches:
            raise RuntimeError(
                f"parameter {entry.slot.name} received gradient {entry.count} in a step armed for "
                f"{self.num_micro_batches} micro-batches; call begin_step() with the right count"
            )
        if entry.count == self.num_micro_batches:
            bucket = entry.bucket
            bucket.pending -= 1
            if bucket.pending == 0 and self.overlap:
                self._launch(bucket)

    def _launch(self, bucket: Bucket) -> None:
        bucket.work = all_reduce_(bucket.grads(), self.dp_group, async_op=True)
        bucket.launched = True

    # ------------------------------------------------------------------ step protocol
    def begin_step(self, num_micro_batches: int) -> None:
        """Arm the hooks: each parameter's gradient is final after ``num_micro_batches`` accumulations."""
        if num_micro_batches < 1:
            raise ValueError(f"num_micro_batches must be >= 1, got {num_micro_batches}")
        if any(bucket.launched for bucket in self.buckets):
            raise RuntimeError("begin_step() called while gradient reductions of the previous step are pending")
        self.num_micro_batches = num_micro_batches
        for entry in self._entries.values():
            entry.count = 0
        for bucket in self.buckets:
            bucket.pending = bucket.num_params

    def finish(self) -> None:
        """Launch the buckets not yet launched (in bucket order), wait for all, then sum partial grads over tp.

        The tensor-parallel sum covers only this rank's owned slice: it is the only part the update reads.
        """
        for bucket in self.buckets:
            if not bucket.launched:
                self._launch(bucket)
        self._wait()
        for buffer in self.buffers:
            if buffer.key.tp_partial_grad:
                all_reduce_(buffer.grad_shard(), self.tp_group)
        self.num_micro_batches = None

    def _wait(self) -> None:
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
            bucket.work = None
            bucket.launched = False

    def zero(self) -> None:
        """Drop all accumulated gradients (waits for in-flight reductions first) and disarm the hooks."""
        self._wait()
        for buffer in self.buffers:
            buffer.grads.zero_()
        for entry in self._entries.values():
            entry.count = 0
            entry.slot.param.grad = None
        self.num_micro_batches = None

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


__all__ = ["Bucket", "GradReducer", "build_buckets"]
