"""What one ``HybridZeroOptimizer.step()`` returns: device tensors that stay on the device until the metrics flush."""

from __future__ import annotations

from typing import Optional

import torch


class StepResult(tuple):
    """What ``HybridZeroOptimizer.step()`` returns: unpacks as ``(grad_norm, skipped)``; all fields are device
    tensors (read them at the metrics flush, not per step).

    ``grad_norm``: fp32 norm of the true (unscaled) gradients before clipping. ``skipped``: the update was not
    applied (non-finite gradients). ``overflow``: skipped on an fp16 overflow the loss scaler absorbs (the scale
    was above ``min_scale``): routine, not a health problem. ``nonfinite``: skipped for any other reason (bf16/fp32
    inf/nan, or fp16 at ``min_scale``). ``loss_scale``: the scale after this step's update (None without fp16).
    """

    def __new__(
        cls,
        grad_norm: torch.Tensor,
        skipped: torch.Tensor,
        overflow: torch.Tensor,
        loss_scale: Optional[torch.Tensor] = None,
    ) -> "StepResult":
        result = super().__new__(cls, (grad_norm, skipped))
        result.overflow = overflow
        result.loss_scale = loss_scale
        return result

    @property
    def grad_norm(self) -> torch.Tensor:
        return self[0]

    @property
    def skipped(self) -> torch.Tensor:
        return self[1]

    @property
    def nonfinite(self) -> torch.Tensor:
        return self[1] & ~self.overflow


__all__ = ["StepResult"]
