"""The metrics of fp16 dynamic loss scaling: one step's device values, and their host form at the metrics flush.

A step of an fp16 run adds to its metrics line (every value stays a device tensor until the logging step's one
read-back, like the loss):

| field | meaning |
| --- | --- |
| ``loss_scale`` | the loss scale after this step's update (the one the next step multiplies its loss by) |
| ``overflow`` | this step was skipped on an fp16 overflow the scaler absorbed (scale above ``min_scale``) |
| ``overflow_steps`` | steps skipped on an overflow so far in the run (saved with the scaler in checkpoints) |

bf16 and fp32 runs have none of these fields.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

FP16_KEYS = ("loss_scale", "overflow", "overflow_steps")


def fp16_metrics(step_result: Any, optimizer: Any) -> Dict[str, Any]:
    """The fp16 fields of one step as device tensors (copies: the scaler updates its tensors in place), or an
    empty dict when the optimizer has no loss scaler."""
    scaler = getattr(optimizer, "grad_scaler", None)
    if scaler is None:
        return {}
    return dict(
        loss_scale=step_result.loss_scale,
        overflow=step_result.overflow,
        overflow_steps=scaler.overflow_steps.clone(),
    )


def read_fp16_metrics(keys: Sequence[str], values: Sequence[float]) -> Dict[str, Any]:
    """The host values of ``keys`` (a subset of `FP16_KEYS`, in that order) read back as ``values`` (floats)."""
    convert = {"loss_scale": float, "overflow": lambda v: v > 0, "overflow_steps": lambda v: int(round(v))}
    return {key: convert[key](value) for key, value in zip(keys, values)}


__all__ = ["FP16_KEYS", "fp16_metrics", "read_fp16_metrics"]
