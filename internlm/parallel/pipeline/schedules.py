"""Pipeline schedules: no pipeline, and 1F1B (one forward, one backward).

Every schedule has the same entry point (docs/architecture.md, "Schedules"):

    loss = schedule.forward_backward(model_chunks, micro_batches, loss_fn, loss_scale, forward_only=False)

All ranks of a pipeline receive the same micro-batch list. The first stage feeds ``input_ids``, the last
stage applies ``loss_fn(logits, labels) -> loss_sum`` and back-propagates ``loss_sum * loss_scale``. The
return value is this rank's summed unscaled loss (fp32 scalar; zero on stages without the head).
"""

from __future__ import annotations

from collections import deque
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from .interleaved import InterleavedSchedule, interleaved_order
from .p2p import PipelineP2P
from .steps import LossFn, as_stage_input, backward_step, chunk_device, forward_step


def one_f_one_b_warmup(pp_size: int, pp_rank: int, micro_num: int, forward_only: bool = False) -> int:
    """Warm-up forwards of 1F1B stage ``pp_rank``: min(pp_size - r - 1, m) (all m when ``forward_only``)."""
    return micro_num if forward_only else min(pp_size - pp_rank - 1, micro_num)


def schedule_order(
    pp_size: int, pp_rank: int, num_chunks: int, micro_num: int, forward_only: bool = False
) -> List[Tuple[str, int, int]]:
    """``("F" or "B", model chunk, micro-batch index)`` in the order the schedule `build_schedule` picks runs them
    on ``pp_rank`` (no pipeline, 1F1B or interleaved 1F1B). A pure function of the sizes: the memory planner
    (`internlm.planning.memory`) replays it."""
    if pp_size == 1:
        return [op for i in range(micro_num) for op in (("F", 0, i), ("B", 0, i))[: 1 if forward_only else 2]]
    if num_chunks > 1:
        return interleaved_order(pp_size, pp_rank, num_chunks, micro_num, forward_only)
    warmup = one_f_one_b_warmup(pp_size, pp_rank, micro_num, forward_only)
    order = [("F", 0, i) for i in range(warmup)]
    for i in range(micro_num - warmup):
        order += [("F", 0, warmup + i), ("B", 0, i)]
    return order + ([] if forward_only else [("B", 0, i) for i in range(micro_num - warmup, micro_num)])


def _single_chunk(model_chunks: List[nn.Module]) -> nn.Module:
    if len(model_chunks) != 1:
        raise ValueError(f"this schedule runs one model chunk per rank, got {len(model_chunks)}")
    return model_chunks[0]


class NoPipelineSchedule:
    """pp_size == 1: forward and backward of each micro-batch in turn; gradients accumulate in ``.grad``."""

    peak_activations = 1

    def forward_backward(
        self,
        model_chunks: List[nn.Module],
        micro_batches: List[Dict],
        loss_fn: LossFn,
        loss_scale: float,
        forward_only: bool = False,
    ) -> torch.Tensor:
        model = _single_chunk(model_chunks)
        loss_total = torch.zeros((), dtype=torch.float32, device=chunk_device(model_chunks))
        with torch.set_grad_enabled(not forward_only):
            for mb in micro_batches:
                scaled = forward_step(model, mb["input_ids"], mb, loss_fn, loss_scale, True, loss_total)
                if not forward_only:
                    backward_step(None, scaled, None)
        return loss_total


class OneFOneBSchedule:
    """Non-interleaved 1F1B over ``pp_size`` stages, one model chunk per rank.

    With ``m`` micro-batches, stage ``r`` runs

    * warm-up: ``w = min(pp_size - r - 1, m)`` forwards, each sending its output downstream;
    * steady: ``m - w`` rounds of one forward then one backward (of the oldest micro-batch in flight),
      exchanging "send output / receive its gradient" and "send input gradient / receive next input"
      with the neighbours in single batched exchanges;
    * cool-down: the ``w`` remaining backwards.

    Stage r therefore holds the activations of at most ``w + 1 <= pp_size - r`` micro-batches at a time
    (``peak_activations`` records the peak of the last call). ``forward_only`` makes every step a
    warm-up forward under ``torch.no_grad()``.
    """

    def __init__(self, pc, tensor_shape: Sequence[int], dtype: torch.dtype) -> None:
        if pc.pp_size < 2:
            raise ValueError("OneFOneBSchedule needs pp_size >= 2; use NoPipelineSchedule for a single stage")
        self.pp_rank, self.pp_size = pc.pp_rank, pc.pp_size
        self.p2p = PipelineP2P(pc, tensor_shape, dtype)
        self.peak_activations = 0

    def forward_backward(
        self,
        model_chunks: List[nn.Module],
        micro_batches: List[Dict],
        loss_fn: LossFn,
        loss_scale: float,
        forward_only: bool = False,
    ) -> torch.Tensor:
        chunk = _single_chunk(model_chunks)
        device = chunk_device(model_chunks)
        first, last = self.pp_rank == 0, self.pp_rank == self.pp_size - 1
        p2p = self.p2p
        num = len(micro_batches)
        warmup = one_f_one_b_warmup(self.pp_size, self.pp_rank, num, forward_only)
        steady = num - warmup
        loss_total = torch.zeros((), dtype=torch.float32, device=device)
        inputs, outputs = deque(), deque()  # activations in flight, oldest first
        self.peak_activations = 0

        def receive_input(index: int) -> torch.Tensor:
            if first:
                return micro_batches[index]["input_ids"]
            return as_stage_input(p2p.recv_forward(device), forward_only)

        def run_forward(index: int, x: torch.Tensor) -> torch.Tensor:
            y = forward_step(chunk, x, micro_batches[index], loss_fn, loss_scale, last, loss_total)
            if not forward_only:
                inputs.append(None if first else x)
                outputs.append(y)
                self.peak_activations = max(self.peak_activations, len(outputs))
            return y

        with torch.set_grad_enabled(not forward_only):
            # Warm-up: fill the pipeline with forwards.
            for i in range(warmup):
                y = run_forward(i, receive_input(i))
                if not last:
                    p2p.send_forward(device, y)

            # Steady state: one forward, then the backward of the oldest micro-batch in flight.
            x = receive_input(warmup) if steady > 0 else None
            for i in range(steady):
                y = run_forward(warmup + i, x)
                dy = None if last else p2p.send_forward_recv_backward(device, y)
                dx = backward_step(inputs.popleft(), outputs.popleft(), dy)
                final = i == steady - 1
                if first:
                    x = None if final else receive_input(warmup + i + 1)
                elif final:
                    p2p.send_backward(device, dx)
                else:
                    x = as_stage_input(p2p.send_backward_recv_forward(device, dx), forward_only)

            # Cool-down: drain the backwards of the warm-up micro-batches.
            if not forward_only:
                for _ in range(warmup):
                    dy = None if last else p2p.recv_backward(device)
                    dx = backward_step(inputs.popleft(), outputs.popleft(), dy)
                    if not first:
                        p2p.send_backward(device, dx)
        return loss_total


def build_schedule(
    pc,
    num_chunks: int,
    micro_bsz: int,
    seq_len: int,
    hidden_size: int,
    dtype: torch.dtype,
    overlap: bool = False,
):
    """The schedule for this parallel layout.

    pp_size 1 -> `NoPipelineSchedule`; num_chunks 1 -> `OneFOneBSchedule`; else `InterleavedSchedule`.
    Stage boundaries carry ``(1, micro_bsz * seq_len / cp / tp, hidden_size)`` tensors: a context rank's tokens
    (cp = parallel.context), split over tensor ranks under sequence parallelism, whole otherwise.
    """
    if pc.pp_size == 1:
        if num_chunks != 1:
            raise ValueError(f"model.num_chunks: {num_chunks} chunks need a pipeline (parallel.pipeline.size > 1)")
        return NoPipelineSchedule()
    tokens = micro_bsz * seq_len // getattr(pc, "cp_size", 1)  # a context rank holds 1/C of the tokens
    if pc.sequence_parallel and pc.tp_size > 1:
        if tokens % pc.tp_size:
            raise ValueError(f"micro_bsz * seq_len = {tokens} tokens do not split over {pc.tp_size} tensor ranks")
        tokens //= pc.tp_size
    shape = (1, tokens, hidden_size)
    if num_chunks == 1:
        return OneFOneBSchedule(pc, shape, dtype)
    return InterleavedSchedule(pc, num_chunks, shape, dtype, overlap)
