"""Point-to-point communication between neighbouring pipeline stages.

Activations travel forward (stage r -> r + 1) and their gradients travel backward (r + 1 -> r). Every
message has the same, known shape and dtype (``(1, tokens, hidden)`` in the model dtype), so the
receiver allocates its buffer up front and no shape is ever exchanged.

Neighbours form a ring over the pipeline group: the interleaved schedule sends the output of virtual
stage ``c * pp + pp - 1`` (last rank, chunk c) to virtual stage ``(c + 1) * pp`` (rank 0, chunk c + 1).
The 1F1B schedule simply never uses the wrap-around link.

All sends and receives of one exchange are posted together (``batch_isend_irecv``): a stage that sends to
its neighbour while that neighbour sends back cannot deadlock, whether the backend's sends are eager or
rendezvous. Activations use tag 0 and gradients tag 1, so with two stages (where the previous and the
next rank are the same process) the two streams cannot be confused on backends that honour tags (gloo).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

ACTIVATION_TAG = 0
GRADIENT_TAG = 1


def ring_neighbours(pc) -> Tuple[int, int]:
    """Global ranks (previous, next) of this stage on the pipeline ring.

    Taken from the pipeline group's rank list when there is one; otherwise from ``pc.pp_prev_rank`` /
    ``pc.pp_next_rank``, which must then be set (a ring, i.e. also for the first and the last stage).
    """
    if pc.pp_group is not None:
        ranks = dist.get_process_group_ranks(pc.pp_group)
        if len(ranks) != pc.pp_size:
            raise ValueError(f"pipeline group has {len(ranks)} ranks but pp_size is {pc.pp_size}")
        return ranks[(pc.pp_rank - 1) % pc.pp_size], ranks[(pc.pp_rank + 1) % pc.pp_size]
    if pc.pp_prev_rank is None or pc.pp_next_rank is None:
        raise ValueError("pipeline p2p needs pc.pp_group, or ring neighbours in pc.pp_prev_rank / pc.pp_next_rank")
    return pc.pp_prev_rank, pc.pp_next_rank


class Exchange:
    """One batch of posted sends and receives. ``wait()`` completes them (idempotent) and returns self.

    ``from_prev`` holds the activation received from the previous stage, ``from_next`` the gradient
    received from the next stage (None when that receive was not requested). The sent tensors are kept
    alive here until the exchange completes.
    """

    def __init__(
        self,
        requests: List,
        from_prev: Optional[torch.Tensor],
        from_next: Optional[torch.Tensor],
        sent: Sequence[torch.Tensor],
    ) -> None:
        self._requests = requests
        self._sent = list(sent)
        self.from_prev = from_prev
        self.from_next = from_next

    def wait(self) -> "Exchange":
        for request in self._requests:
            request.wait()
        self._requests, self._sent = [], []
        return self


class PipelineP2P:
    """Sends and receives of fixed-shape tensors between this stage and its ring neighbours."""

    def __init__(self, pc, tensor_shape: Sequence[int], dtype: torch.dtype) -> None:
        self.group = pc.pp_group
        self.prev_rank, self.next_rank = ring_neighbours(pc)
        self.tensor_shape = tuple(tensor_shape)
        self.dtype = dtype

    def _buffer(self, device: torch.device) -> torch.Tensor:
        return torch.empty(self.tensor_shape, dtype=self.dtype, device=device)

    def _check(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        if tuple(tensor.shape) != self.tensor_shape or tensor.dtype != self.dtype:
            raise RuntimeError(
                f"pipeline {what} has shape {tuple(tensor.shape)} and dtype {tensor.dtype}, but the schedule was "
                f"built for {self.tensor_shape} {self.dtype} (micro_bsz * seq_len tokens of hidden_size)"
            )
        return tensor.detach().contiguous()

    def exchange(
        self,
        device: torch.device,
        send_next: Optional[torch.Tensor] = None,
        send_prev: Optional[torch.Tensor] = None,
        recv_prev: bool = False,
        recv_next: bool = False,
    ) -> Exchange:
        """Post, without waiting, the requested transfers of one schedule step.

        send_next: activation for the next stage; send_prev: gradient for the previous stage;
        recv_prev: receive an activation from the previous stage; recv_next: a gradient from the next.
        Ops are posted activation stream first, then gradient stream, on every rank, so backends that
        match messages by order (NCCL) see the same order on both ends of a link.
        """
        ops, sent = [], []
        from_prev = self._buffer(device) if recv_prev else None
        from_next = self._buffer(device) if recv_next else None
        if send_next is not None:
            sent.append(self._check(send_next, "activation"))
            ops.append(dist.P2POp(dist.isend, sent[-1], self.next_rank, self.group, ACTIVATION_TAG))
        if from_prev is not None:
            ops.append(dist.P2POp(dist.irecv, from_prev, self.prev_rank, self.group, ACTIVATION_TAG))
        if send_prev is not None:
            sent.append(self._check(send_prev, "gradient"))
            ops.append(dist.P2POp(dist.isend, sent[-1], self.prev_rank, self.group, GRADIENT_TAG))
        if from_next is not None:
            ops.append(dist.P2POp(dist.irecv, from_next, self.next_rank, self.group, GRADIENT_TAG))
        requests = dist.batch_isend_irecv(ops) if ops else []
        return Exchange(requests, from_prev, from_next, sent)

    # Blocking helpers named after the transfers the 1F1B schedule performs.
    def recv_forward(self, device: torch.device) -> torch.Tensor:
        return self.exchange(device, recv_prev=True).wait().from_prev

    def send_forward(self, device: torch.device, output: torch.Tensor) -> None:
        self.exchange(device, send_next=output).wait()

    def recv_backward(self, device: torch.device) -> torch.Tensor:
        return self.exchange(device, recv_next=True).wait().from_next

    def send_backward(self, device: torch.device, grad: torch.Tensor) -> None:
        self.exchange(device, send_prev=grad).wait()

    def send_forward_recv_backward(self, device: torch.device, output: torch.Tensor) -> torch.Tensor:
        return self.exchange(device, send_next=output, recv_next=True).wait().from_next

    def send_backward_recv_forward(self, device: torch.device, grad: torch.Tensor) -> torch.Tensor:
        return self.exchange(device, send_prev=grad, recv_prev=True).wait().from_prev
