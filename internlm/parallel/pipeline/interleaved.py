"""Interleaved 1F1B (Megatron's virtual pipeline) over ``num_chunks`` model chunks per rank.

Rank r holds chunks c = 0 .. V-1 (V = num_chunks), chunk c being virtual stage ``c * pp + r``. With ``m``
micro-batches (a multiple of pp) each rank runs ``m * V`` forward and ``m * V`` backward *virtual steps*.

Order. Virtual step k belongs to group ``k // (pp * V)`` and position ``p = k % (pp * V)`` inside it; its
forward runs chunk ``p // pp`` on micro-batch ``group * pp + p % pp``: pp micro-batches go through chunk 0,
then the same pp through chunk 1, and so on. Backward step k runs the same micro-batch through chunk
``V - 1 - p // pp`` (chunks in reverse).

Phases on rank r (all forwards when ``forward_only``):

* warm-up: ``w = min(m * V, 2 * (pp - r - 1) + (V - 1) * pp)`` forwards;
* steady: ``m * V - w`` rounds of forward step ``w + i`` then backward step ``i``;
* cool-down: the last ``w`` backward steps.

Communication. Without overlap, each step ends in one batched exchange with both neighbours (send output
and input gradient, receive the next step's input and output gradient), posted before anything waits, which
cannot deadlock. With ``overlap=True`` the forward-direction transfers of a round are posted right after its
forward and the backward-direction ones right after its backward, and each is waited only just before the
tensor it delivers is used, so transfers run behind the other half of the round's compute.
"""

from __future__ import annotations

from collections import deque
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .p2p import Exchange, PipelineP2P
from .steps import LossFn, as_stage_input, backward_step, chunk_device, forward_step


def interleaved_forward_position(k: int, pp_size: int, num_chunks: int) -> Tuple[int, int]:
    """(chunk, micro-batch index) of forward virtual step k (the module docstring's order)."""
    group, pos = divmod(k, pp_size * num_chunks)
    return pos // pp_size, group * pp_size + pos % pp_size


def interleaved_backward_position(k: int, pp_size: int, num_chunks: int) -> Tuple[int, int]:
    """(chunk, micro-batch index) of backward virtual step k: chunks in reverse order."""
    chunk, index = interleaved_forward_position(k, pp_size, num_chunks)
    return num_chunks - 1 - chunk, index


def interleaved_warmup(pp_size: int, pp_rank: int, num_chunks: int, total: int, forward_only: bool = False) -> int:
    """Warm-up forward virtual steps of rank ``pp_rank`` out of ``total``: min(total, 2 (pp - r - 1) + (V - 1) pp)."""
    if forward_only:
        return total
    return min(total, 2 * (pp_size - pp_rank - 1) + (num_chunks - 1) * pp_size)


def interleaved_order(
    pp_size: int, pp_rank: int, num_chunks: int, micro_num: int, forward_only: bool = False
) -> List[Tuple[str, int, int]]:
    """``("F" or "B", chunk, micro-batch index)`` in the order `InterleavedSchedule.forward_backward` runs them on
    ``pp_rank``: warm-up forwards, then forward step ``w + i`` and backward step ``i``, then the last backwards."""
    total = micro_num * num_chunks
    warmup = interleaved_warmup(pp_size, pp_rank, num_chunks, total, forward_only)
    order = [("F", *interleaved_forward_position(k, pp_size, num_chunks)) for k in range(warmup)]
    for i in range(total - warmup):
        order.append(("F", *interleaved_forward_position(warmup + i, pp_size, num_chunks)))
        order.append(("B", *interleaved_backward_position(i, pp_size, num_chunks)))
    if not forward_only:
        order += [("B", *interleaved_backward_position(k, pp_size, num_chunks)) for k in range(total - warmup, total)]
    return order


class InterleavedSchedule:
    """Interleaved 1F1B; ``forward_backward`` takes this rank's ``num_chunks`` chunks in chunk order."""

    def __init__(
        self, pc, num_chunks: int, tensor_shape: Sequence[int], dtype: torch.dtype, overlap: bool = False
    ) -> None:
        if pc.pp_size < 2 or num_chunks < 2:
            raise ValueError(
                f"InterleavedSchedule needs pp_size >= 2 and num_chunks >= 2, got {pc.pp_size} and {num_chunks}; "
                "use OneFOneBSchedule for one chunk per rank"
            )
        self.pp_rank, self.pp_size, self.num_chunks = pc.pp_rank, pc.pp_size, num_chunks
        self.overlap = overlap
        self.p2p = PipelineP2P(pc, tensor_shape, dtype)
        self.peak_activations = 0

    # ------------------------------------------------------------------ virtual step order
    def forward_position(self, k: int) -> Tuple[int, int]:
        """(chunk, micro-batch index) of forward virtual step k."""
        return interleaved_forward_position(k, self.pp_size, self.num_chunks)

    def backward_position(self, k: int) -> Tuple[int, int]:
        """(chunk, micro-batch index) of backward virtual step k: chunks in reverse order."""
        return interleaved_backward_position(k, self.pp_size, self.num_chunks)

    def warmup_steps(self, total: int, forward_only: bool) -> int:
        return interleaved_warmup(self.pp_size, self.pp_rank, self.num_chunks, total, forward_only)

    def _is_first(self, chunk: int) -> bool:
        return self.pp_rank == 0 and chunk == 0

    def _is_last(self, chunk: int) -> bool:
        return self.pp_rank == self.pp_size - 1 and chunk == self.num_chunks - 1

    # ------------------------------------------------------------------ schedule
    def forward_backward(
        self,
        model_chunks: List[nn.Module],
        micro_batches: List[Dict],
        loss_fn: LossFn,
        loss_scale: float,
        forward_only: bool = False,
    ) -> torch.Tensor:
        if len(model_chunks) != self.num_chunks:
            raise ValueError(f"expected {self.num_chunks} model chunks on this rank, got {len(model_chunks)}")
        num = len(micro_batches)
        if num % self.pp_size:
            raise ValueError(f"interleaved schedule needs micro_num divisible by pp_size={self.pp_size}, got {num}")
        device = chunk_device(model_chunks)
        total = num * self.num_chunks
        warmup = self.warmup_steps(total, forward_only)
        steady = total - warmup
        p2p, overlap = self.p2p, self.overlap
        loss_total = torch.zeros((), dtype=torch.float32, device=device)
        inputs = [deque() for _ in model_chunks]  # per chunk, oldest micro-batch first
        outputs = [deque() for _ in model_chunks]
        pending: List[Exchange] = []  # every exchange, waited at the end so no send is left in flight
        self.peak_activations = 0

        def post(**kwargs) -> Exchange:
            ex = p2p.exchange(device, **kwargs)
            pending.append(ex)
            return ex if overlap else ex.wait()

        def needs_input(k: int) -> bool:
            return k < total and not self._is_first(self.forward_position(k)[0])

        def needs_output_grad(k: int) -> bool:
            return k < total and not self._is_last(self.backward_position(k)[0])

        def run_forward(k: int, received: Optional[Exchange]) -> Optional[torch.Tensor]:
            """Forward step k; returns the output to send downstream (None on the last virtual stage)."""
            chunk, index = self.forward_position(k)
            mb = micro_batches[index]
            if self._is_first(chunk):
                x = mb["input_ids"]
            else:
                x = as_stage_input(received.wait().from_prev, forward_only)
            y = forward_step(model_chunks[chunk], x, mb, loss_fn, loss_scale, self._is_last(chunk), loss_total)
            if not forward_only:
                inputs[chunk].append(None if self._is_first(chunk) else x)
                outputs[chunk].append(y)
                self.peak_activations = max(self.peak_activations, sum(len(q) for q in outputs))
            return None if self._is_last(chunk) else y

        def run_backward(k: int, received: Optional[Exchange]) -> Optional[torch.Tensor]:
            """Backward step k; returns the input gradient to send upstream (None on the first virtual stage)."""
            chunk, _ = self.backward_position(k)
            dy = None if self._is_last(chunk) else received.wait().from_next
            dx = backward_step(inputs[chunk].popleft(), outputs[chunk].popleft(), dy)
            return None if self._is_first(chunk) else dx

        with torch.set_grad_enabled(not forward_only):
            fwd_recv = post(recv_prev=needs_input(0))
            bwd_recv: Optional[Exchange] = None

            # Warm-up: forwards only. The last one also asks for the output gradient of backward step 0.
            for k in range(warmup):
                y = run_forward(k, fwd_recv)
                want_grad = k == warmup - 1 and not forward_only
                fwd_recv = post(send_next=y, recv_prev=needs_input(k + 1), recv_next=want_grad and needs_output_grad(0))
                if want_grad:
                    bwd_recv = fwd_recv

            # Steady state: forward step warmup + i, then backward step i.
            for i in range(steady):
                k_fwd = warmup + i
                y = run_forward(k_fwd, fwd_recv)
                if overlap:  # ship the activation while the backward computes
                    fwd_recv = post(send_next=y, recv_prev=needs_input(k_fwd + 1))
                    dx = run_backward(i, bwd_recv)
                    bwd_recv = post(send_prev=dx, recv_next=needs_output_grad(i + 1))
                else:
                    dx = run_backward(i, bwd_recv)
                    fwd_recv = bwd_recv = post(
                        send_next=y, send_prev=dx, recv_prev=needs_input(k_fwd + 1), recv_next=needs_output_grad(i + 1)
                    )

            # Cool-down: the remaining backwards.
            if not forward_only:
                for k in range(steady, total):
                    dx = run_backward(k, bwd_recv)
                    bwd_recv = post(send_prev=dx, recv_next=needs_output_grad(k + 1))

            for ex in pending:
                ex.wait()
        return loss_total
