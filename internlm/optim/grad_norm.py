"""Global L2 norm of the model gradient from the sharded fp32 gradient buffers.

After the data-parallel all-reduce every rank holds the full summed gradient, but each element is counted
exactly once by summing, per rank, the squares of its *owned* slice only and adding those partial sums over:

* the zero1 group: its slices tile every buffer of this model replica's parameters;
* the tensor group: tensor ranks hold different shards (buffers marked ``tp_duplicate`` hold the same
  values on every tensor rank and are counted on tensor rank 0 only);
* the pipeline group: stages hold different layers.

Data-parallel ranks outside the zero1 group (other zero1 subgroups of a hybrid layout) hold identical
values and are not summed again. The result is one scalar all-reduce per group.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from internlm.parallel.comm import all_reduce_

from .flat_buffer import FlatBuffer


def global_grad_norm(
    buffers: Sequence[FlatBuffer], zero1_group: Any, tp_group: Any, pp_group: Any, tp_rank: int
) -> torch.Tensor:
    """L2 norm (fp32 scalar tensor, same on every rank) of the whole model's gradient; inf/nan propagate."""
    device = buffers[0].grads.device
    total = torch.zeros((), dtype=torch.float32, device=device)
    for buffer in buffers:
        if buffer.key.tp_duplicate and tp_rank != 0:
            continue
        total += torch.linalg.vector_norm(buffer.grad_shard()).square()
    for group in (zero1_group, tp_group, pp_group):
        all_reduce_(total, group)
    return total.sqrt()


__all__ = ["global_grad_norm"]
