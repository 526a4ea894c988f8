"""The optimizer's sections: ``adam``, ``lr_scheduler``, ``beta2_scheduler``, ``hybrid_zero_optimizer``,
``grad_scaler`` (fp16 loss scaling) and ``loss``."""

import dataclasses
from typing import Annotated, Optional

from ..keys import key, section


@section("adam")
@dataclasses.dataclass(frozen=True)
class AdamSection:
    """AdamW hyper-parameters."""

    lr: Annotated[float, key(1e-4, "peak learning rate", minimum=0)]
    adam_beta1: Annotated[float, key(0.9, "beta1", minimum=0, maximum=1)]
    adam_beta2: Annotated[float, key(0.95, "beta2 (initial value of the beta2 schedule)", minimum=0, maximum=1)]
    adam_beta2_c: Annotated[float, key(0.0, "beta2 schedule coefficient; 0 keeps beta2 constant", minimum=0)]
    adam_eps: Annotated[float, key(1e-8, "epsilon", minimum=0)]
    weight_decay: Annotated[float, key(0.01, "decoupled weight decay", minimum=0)]


@section("lr_scheduler")
@dataclasses.dataclass(frozen=True)
class LRSchedulerSection:
    """Linear warmup then cosine decay to eta_min."""

    total_steps: Annotated[
        Optional[int],
        key(
            None,
            "schedule length; None resolves to data.total_steps (or the steps the trainer derives from "
            "data.total_tokens)",
            minimum=1,
        ),
    ]
    init_steps: Annotated[int, key(0, "steps already taken before this schedule starts", minimum=0)]
    warmup_ratio: Annotated[float, key(0.01, "fraction of total_steps spent warming up", minimum=0, maximum=1)]
    eta_min: Annotated[float, key(1e-5, "final learning rate; must not exceed adam.lr", minimum=0)]
    last_epoch: Annotated[int, key(-1, "scheduler position to start from; -1: the beginning", minimum=-1)]


@section("beta2_scheduler")
@dataclasses.dataclass(frozen=True)
class Beta2SchedulerSection:
    """Schedule of Adam's beta2 (InternLM's Beta2Scheduler); constant when c = 0."""

    init_beta2: Annotated[Optional[float], key(None, "None resolves to adam.adam_beta2", minimum=0, maximum=1)]
    c: Annotated[Optional[float], key(None, "None resolves to adam.adam_beta2_c", minimum=0)]
    cur_iter: Annotated[int, key(-1, "schedule position to start from; -1: the beginning", minimum=-1)]


@section("hybrid_zero_optimizer")
@dataclasses.dataclass(frozen=True)
class HybridZeroOptimizerSection:
    """ZeRO optimizer communication and clipping."""

    overlap_sync_grad: Annotated[bool, key(True, "reduce gradient buckets while backward still runs")]
    overlap_sync_param: Annotated[bool, key(True, "broadcast updated parameter shards asynchronously")]
    reduce_bucket_size: Annotated[
        int,
        key(
            512 * 1024 * 1024, "gradient reduction bucket size in elements", minimum=1, default_text="512 * 1024 * 1024"
        ),
    ]
    clip_grad_norm: Annotated[float, key(1.0, "global gradient norm clip; 0 disables clipping", minimum=0)]


@section("grad_scaler.fp16")
@dataclasses.dataclass(frozen=True)
class Fp16Section:
    """loss scale range"""

    initial_scale: Annotated[float, key(2.0**16, "starting loss scale", minimum=0, default_text="2**16")]
    min_scale: Annotated[float, key(1.0, "smallest loss scale", minimum=0)]
    growth_interval: Annotated[int, key(1000, "overflow-free steps before the scale grows", minimum=1)]


@section("grad_scaler")
@dataclasses.dataclass(frozen=True)
class GradScalerSection:
    """Dynamic loss scaling, used only when model.dtype is torch.float16."""

    fp16: Fp16Section
    growth_factor: Annotated[float, key(2.0, "scale multiplier after growth_interval clean steps", minimum=1)]
    backoff_factor: Annotated[float, key(0.5, "scale multiplier after an overflow", minimum=0, maximum=1)]
    max_scale: Annotated[float, key(2.0**24, "largest loss scale", minimum=0, default_text="2**24")]
    hysteresis: Annotated[int, key(2, "overflows tolerated before backing off", minimum=1)]


@section("loss")
@dataclasses.dataclass(frozen=True)
class LossSection:
    """Training loss."""

    label_smoothing: Annotated[float, key(0.0, "label smoothing of the cross-entropy", minimum=0, maximum=1)]


__all__ = [
    "AdamSection",
    "LRSchedulerSection",
    "Beta2SchedulerSection",
    "HybridZeroOptimizerSection",
    "GradScalerSection",
    "Fp16Section",
    "LossSection",
]
