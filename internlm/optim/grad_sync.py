"""Gradient accumulation into the fp32 buffers and the bucketed reduction: reduce-scatter inside the zero1 group,
then all-reduce of the owned slice over the zero1 replicas.

Every managed parameter gets a post-accumulate-grad hook. When autograd has produced ``param.grad`` the hook
adds it (cast to fp32) into the parameter's `GradPiece` ranges of its buffer's accumulation tensor and drops
``param.grad``, so micro-batch accumulation happens once, in fp32, whatever the model dtype, and no model-dtype
gradient outlives its backward. (Plain torch cannot make autograd accumulate a bf16 parameter's gradient
straight into an fp32 tensor: ``param.grad`` must have the parameter's dtype. That needs a fused weight-gradient
kernel inside each linear layer's backward, as Megatron's ``gradient_accumulation_fusion``; the hook costs one
fp32 add per parameter and micro-batch, and the bf16 gradient it frees is the one autograd allocates anyway.)

A bucket is one column range of a buffer (`FlatBuffer.columns`): the same range of every zero1 slice,
stored contiguously as ``zero1_size`` rows. ``begin_step(n)`` arms the counting: a parameter is final after its
n-th gradient, and a bucket is ready once every parameter touching it is final. With ``overlap`` a ready
bucket is launched from inside backward; otherwise, and for buckets that never became ready, in ``finish()``.
Launching a bucket of ``n`` elements (all slices together) is, with ``z = zero1_size`` and ``r`` zero1
replicas (``dp_size / z``):

1. reduce-scatter (SUM) over the zero1 group: rank z receives the sum of its own row, ``n / z`` elements,
   into its reduced gradient slice (`FlatBuffer.grad_shard`); ring volume sent ``4 n (z - 1) / z`` bytes;
2. once that has completed, all-reduce (SUM) of those ``n / z`` elements over the zero1 replica group (ranks
   with the same zero1 rank in the other zero1 blocks): ``2 * 4 (n / z) (r - 1) / r`` bytes. These are issued
   in launch order, from later hooks as soon as the reduce-scatter is found complete, or in ``finish()``.

Summed over buckets that is the optimum for "each rank ends with the global sum of its slice". The loss is
already normalised by the global token count, so the sum is the gradient of the global loss (see
docs/architecture.md, "Loss normalisation"). Every data-parallel rank must launch the buckets in the same
order; this holds when all ranks run the same backward graph, as in InternLM training.

The accumulation tensor is free between ``finish()`` and the next backward: the parameter all-gather uses
it as its receive buffer and zeroes it (`collectives.ParamGatherer`); ``before_accumulate(buffer)`` lets the
gatherer finish first should a gradient arrive while a gather into that buffer is still in flight.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence

import torch
from torch import nn

from internlm.parallel.comm import all_reduce_, group_size, reduce_scatter_into

from .flat_buffer import FlatBuffer, GradPiece, ParamSlot


@dataclass(eq=False)
class Bucket:
    """One column range of a gradient buffer: one reduce-scatter, then one replica all-reduce."""

    buffer: FlatBuffer
    index: int  # into buffer.columns
    num_params: int = 0
    pending: int = 0  # parameters not yet final in the current step
    scatter: Optional[Any] = None  # async handle of the reduce-scatter while in flight
    replica: Optional[Any] = None  # async handle of the replica all-reduce while in flight
    launched: bool = False

    def grads(self) -> torch.Tensor:
        """The accumulation block: ``zero1_size`` rows, row z = slice z (the reduce-scatter input)."""
        return self.buffer.grad_block(self.index)

    def reduced(self) -> torch.Tensor:
        """This rank's reduced piece (the reduce-scatter output, the replica all-reduce operand)."""
        return self.buffer.grad_shard_block(self.index)


@dataclass(eq=False)
class _Entry:
    buffer: FlatBuffer
    slot: ParamSlot
    pieces: List[GradPiece]
    buckets: List[Bucket] = field(default_factory=list)
    count: int = 0


class GradReducer:
    """Owns the gradient hooks and the bucket reductions over the zero1 group, the zero1 replica group and (for
    partial gradients) the tensor group."""

    def __init__(
        self,
        buffers: Sequence[FlatBuffer],
        zero1_group: Any,
        replica_group: Any,
        tp_group: Any,
        overlap: bool,
    ) -> None:
        self.buffers = list(buffers)
        self.zero1_group = zero1_group
        self.replica_group = replica_group
        self.tp_group = tp_group
        self.overlap = overlap
        self.num_micro_batches: Optional[int] = None
        self.before_accumulate: Optional[Callable[[FlatBuffer], None]] = None
        self.buckets: List[Bucket] = []
        self._entries: Dict[int, _Entry] = {}
        self._scatter = group_size(zero1_group) > 1
        self._replicas = group_size(replica_group) > 1
        self._to_replicate: Deque[Bucket] = deque()  # launched buckets whose replica all-reduce is not yet issued
        for buffer in self.buffers:
            buckets = [Bucket(buffer, index) for index in range(len(buffer.columns))]
            self.buckets.extend(buckets)
            for slot in buffer.slots:
                pieces = buffer.grad_pieces(slot)
                touched = [buckets[i] for i in sorted({piece.bucket for piece in pieces})]
                for bucket in touched:
                    bucket.num_params += 1
                self._entries[id(slot.param)] = _Entry(buffer, slot, pieces, touched)
        self._hooks = [
            entry.slot.param.register_post_accumulate_grad_hook(self._on_grad) for entry in self._entries.values()
        ]

    # ------------------------------------------------------------------ hooks
    @torch.no_grad()
    def _on_grad(self, param: nn.Parameter) -> None:
        entry = self._entries[id(param)]
        if self.before_accumulate is not None:
            self.before_accumulate(entry.buffer)
        grad, grads = param.grad.reshape(-1), entry.buffer.grads
        for piece in entry.pieces:
            grads[piece.dest : piece.dest + piece.hi - piece.lo].add_(grad[piece.lo : piece.hi])
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
            for bucket in entry.buckets:
                bucket.pending -= 1
                if bucket.pending == 0 and self.overlap:
                    self._launch(bucket)
        if self.overlap:
            self._replicate_completed()

    def _launch(self, bucket: Bucket) -> None:
        if self._scatter:
            bucket.scatter = reduce_scatter_into(bucket.reduced(), bucket.grads(), self.zero1_group, async_op=True)
        bucket.launched = True
        if self._replicas:
            self._to_replicate.append(bucket)

    def _replicate(self, bucket: Bucket) -> None:
        bucket.replica = all_reduce_(bucket.reduced(), self.replica_group, async_op=True)

    def _replicate_completed(self) -> None:
        """Issue the replica all-reduces, in launch order, of buckets whose reduce-scatter has completed."""
        queue = self._to_replicate
        while queue and (queue[0].scatter is None or queue[0].scatter.is_completed()):
            self._replicate(queue.popleft())

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
        """Launch the buckets not yet launched (in bucket order), complete every reduction, then sum the partial
        gradients over the tensor group.

        Afterwards `FlatBuffer.grad_shard` holds the global gradient of this rank's slice (the tensor-parallel sum
        covers only that slice: it is the only part the update reads), and the accumulation tensor is spent.
        """
        for bucket in self.buckets:
            if not bucket.launched:
                self._launch(bucket)
        while self._to_replicate:
            bucket = self._to_replicate.popleft()
            if bucket.scatter is not None:
                bucket.scatter.wait()
                bucket.scatter = None
            self._replicate(bucket)
        self._wait()
        for buffer in self.buffers:
            if buffer.key.tp_partial_grad:
                all_reduce_(buffer.grad_shard(), self.tp_group)
        self.num_micro_batches = None

    def _wait(self) -> None:
        self._to_replicate.clear()
        for bucket in self.buckets:
            for work in (bucket.scatter, bucket.replica):
                if work is not None:
                    work.wait()
            bucket.scatter = bucket.replica = None
            bucket.launched = False

    def zero(self) -> None:
        """Drop all accumulated and reduced gradients (waits for in-flight reductions first) and disarm the hooks.

        The caller makes sure no parameter all-gather still uses the accumulation tensor.
        """
        self._wait()
        for buffer in self.buffers:
            buffer.grads.zero_()
            buffer.grad_shard().zero_()
        for entry in self._entries.values():
            entry.count = 0
            entry.slot.param.grad = None
        self.num_micro_batches = None

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


__all__ = ["Bucket", "GradReducer"]
