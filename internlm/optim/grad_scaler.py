"""Dynamic loss scaling for fp16 training, with InternLM's ``DynamicGradScaler`` semantics, kept on the device.

The loss is multiplied by ``scale`` before backward, so fp16 gradients of small magnitude do not flush to zero;
the optimizer divides the fp32 gradients by ``scale`` again before clipping and the update. After each step,
``update(overflow)`` (``overflow``: the scaled gradients held an inf/nan on some rank) applies::

    overflow:     overflows += 1; clean = 0
                  if overflows >= hysteresis: scale = max(scale * backoff_factor, min_scale)
    no overflow:  clean += 1
                  if clean == growth_interval: clean = 0; overflows = 0; scale = min(scale * growth_factor, max_scale)

``overflows`` counts overflows since the last growth (not consecutive ones): after ``hysteresis`` of them every
further overflow backs off again, as in InternLM. Every value is a device tensor updated with ``torch.where``,
so ``update`` never reads anything back on the host (the step stays sync-free); ``state_dict`` reads them.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Union

import torch


class DynamicGradScaler:
    """Loss scale, growth/backoff trackers and the count of overflow steps, as 0-d device tensors.

    ``scale`` is fp32; ``overflow_steps`` counts every step skipped on an overflow (for the metrics).
    """

    def __init__(
        self,
        initial_scale: float = 2.0**16,
        min_scale: float = 1.0,
        growth_interval: int = 1000,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        max_scale: Optional[float] = 2.0**24,
        hysteresis: int = 2,
        device: Union[str, torch.device, None] = None,
    ) -> None:
        if not initial_scale > 0:
            raise ValueError(f"grad_scaler.fp16.initial_scale must be > 0, got {initial_scale}")
        if not min_scale > 0 or min_scale > initial_scale:
            raise ValueError(
                f"grad_scaler.fp16.min_scale must be in (0, initial_scale={initial_scale}], got {min_scale}"
            )
        if max_scale is not None and max_scale < initial_scale:
            raise ValueError(f"grad_scaler.max_scale must be >= initial_scale={initial_scale}, got {max_scale}")
        if not growth_factor > 1:
            raise ValueError(f"grad_scaler.growth_factor must be > 1, got {growth_factor}")
        if not 0 < backoff_factor < 1:
            raise ValueError(f"grad_scaler.backoff_factor must be in (0, 1), got {backoff_factor}")
        if growth_interval < 1 or hysteresis < 1:
            raise ValueError(
                f"grad_scaler.fp16.growth_interval and grad_scaler.hysteresis must be >= 1, got "
                f"{growth_interval} and {hysteresis}"
            )
        self.min_scale = float(min_scale)
        self.max_scale = float(max_scale) if max_scale is not None else float("inf")
        self.growth_interval = int(growth_interval)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.hysteresis = int(hysteresis)
        self.initial_scale = float(initial_scale)
        self.scale = torch.tensor(float(initial_scale), dtype=torch.float32, device=device)
        self._clean = torch.zeros((), dtype=torch.int64, device=device)  # overflow-free steps since growth/overflow
        self._overflows = torch.zeros((), dtype=torch.int64, device=device)  # overflows since the last growth
        self.overflow_steps = torch.zeros((), dtype=torch.int64, device=device)

    @property
    def inv_scale(self) -> torch.Tensor:
        """``1 / scale`` in fp32 (computed in fp64, as InternLM does)."""
        return self.scale.double().reciprocal().float()

    def at_min_scale(self) -> torch.Tensor:
        """Bool device tensor: the scale cannot back off any further."""
        return self.scale <= self.min_scale

    @torch.no_grad()
    def update(self, overflow: torch.Tensor) -> None:
        """Advance the trackers after a step; ``overflow`` is a bool (or 0/1) device tensor, the same on every
        rank. No host sync."""
        overflow = overflow.to(torch.bool)
        clean = torch.where(overflow, torch.zeros_like(self._clean), self._clean + 1)
        overflows = torch.where(overflow, self._overflows + 1, self._overflows)
        backoff = overflow & (overflows >= self.hysteresis)
        grow = (~overflow) & (clean >= self.growth_interval)
        scale = torch.where(backoff, torch.clamp(self.scale * self.backoff_factor, min=self.min_scale), self.scale)
        scale = torch.where(grow, torch.clamp(scale * self.growth_factor, max=self.max_scale), scale)
        self._clean.copy_(torch.where(grow, torch.zeros_like(clean), clean))
        self._overflows.copy_(torch.where(grow, torch.zeros_like(overflows), overflows))
        self.scale.copy_(scale)
        self.overflow_steps.add_(overflow.to(torch.int64))

    def state_dict(self) -> Dict[str, Any]:
        """Plain Python values (reading them synchronises): ``scale``, ``growth_tracker`` (clean steps),
        ``hysteresis_tracker`` (overflows since the last growth), ``overflow_steps``."""
        return dict(
            scale=float(self.scale),
            growth_tracker=int(self._clean),
            hysteresis_tracker=int(self._overflows),
            overflow_steps=int(self.overflow_steps),
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned (the configured factors and bounds stay those of this run)."""
        self.scale.fill_(float(state["scale"]))
        self._clean.fill_(int(state["growth_tracker"]))
        self._overflows.fill_(int(state["hysteresis_tracker"]))
        self.overflow_steps.fill_(int(state.get("overflow_steps", 0)))


__all__ = ["DynamicGradScaler"]
