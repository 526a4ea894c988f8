"""What a run reports: the ``monitor`` (logging), ``profile`` (torch.profiler traces) and ``health`` sections."""

import dataclasses
from typing import Annotated, Any, Dict, Mapping, Optional

from .. import compat
from ..keys import EQUIVALENT, key, section

WANDB_KEYS = ("project", "mode", "name", "entity", "dir", "tags", "group")
WANDB_MODES = ("online", "offline", "disabled")


def wandb_settings(value: Mapping[str, Any]) -> Dict[str, Any]:
    """``monitor.wandb`` checked: known keys, a project, a mode of `WANDB_MODES` (internlm/train/wandb_logger.py)."""
    unknown = sorted(set(value) - set(WANDB_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))}; keys: {', '.join(WANDB_KEYS)}")
    if value and not value.get("project"):
        raise ValueError("needs a project name: dict(project=..., mode='offline')")
    if value.get("mode", "online") not in WANDB_MODES:
        raise ValueError(f"mode {value.get('mode')!r} must be one of {', '.join(WANDB_MODES)}")
    return dict(value)


@section("monitor")
@dataclasses.dataclass(frozen=True)
class MonitorSection:
    """Logging."""

    tensorboard: Annotated[bool, key(True, "write TensorBoard scalars under {work_dir}/tensorboard")]
    log_every: Annotated[
        int,
        key(
            1,
            "read the step metrics back from the device every this many steps (the one host sync of the step "
            "loop), then write every step's metrics.jsonl line and TensorBoard scalars (with the peak memory since "
            "the previous read) and refresh the progress bar, or print a plain step line when stdout is not a "
            "terminal; the stop request (ckpt.stop_file_path, SIGTERM) is agreed on at these steps too, and training "
            "health (the health section) is decided there",
            minimum=1,
        ),
    ]
    peak_tflops: Annotated[
        Optional[float],
        key(
            None,
            "peak TFLOP/s of one device, the denominator of MFU; None: known GPUs' dense bf16 figure "
            "(internlm.planning.devices); on a CPU or an unknown device MFU is then not reported (n/a)",
            minimum=0,
        ),
    ]
    wandb: Annotated[
        Dict[str, Any],
        key(
            {},
            "Weights & Biases logging beside TensorBoard: dict(project=..., mode='online'|'offline'|'disabled', "
            "name, entity, group, tags, dir (default {work_dir}/wandb)); offline needs no network; {}: off",
            normalize=wandb_settings,
        ),
    ]
    alert: Annotated[
        Dict[str, Any],
        key(
            {},
            "InternLM's alert keys: with enable_feishu_alert=True, feishu_alert_address is a webhook URL, and "
            "light_monitor_address (a URL, or host:port for http://host:port) another one; rank 0 POSTs a small JSON "
            "body (Feishu- and Slack-style text plus the event's fields) to each on start, stop, unhealthy, hang and "
            "restart events (docs/troubleshooting.md); a failing webhook is warned about once and never stops training",
            compat=EQUIVALENT,
            normalize=compat.alert,
        ),
    ]
    hang_timeout_s: Annotated[
        Optional[float],
        key(
            None,
            "a training step (with its metrics flush, validation and checkpoint save) that takes longer than this "
            "many seconds is a hang: every rank writes the Python stacks of its threads to "
            "{work_dir}/hang_rank<r>.txt and the run exits with status 124; None: 0.9 x parallel.timeout_minutes "
            "(the stacks are written before a collective's own timeout); 0: off",
            minimum=0,
        ),
    ]
    straggler_factor: Annotated[
        float,
        key(
            1.5,
            "at every logging step (monitor.log_every) the ranks' forward/backward times since the previous one are "
            "gathered; a rank slower than straggler_factor x their median is warned about by rank and host, and the "
            "times go to metrics.jsonl (step_time_ranks); 0: off",
            minimum=0,
        ),
    ]


@section("profile")
@dataclasses.dataclass(frozen=True)
class ProfileSection:
    """torch.profiler traces of a few steps (Chrome trace JSON, for Perfetto or TensorBoard), written under
    {work_dir}/profile; see README.md."""

    start_step: Annotated[Optional[int], key(None, "first global step to profile; None: profiling is off", minimum=1)]
    end_step: Annotated[Optional[int], key(None, "last global step to profile; None: start_step", minimum=1)]
    memory: Annotated[
        bool,
        key(
            False,
            "also record memory: allocations in the trace and, on CUDA, a memory snapshot "
            "(torch.cuda.memory._dump_snapshot, viewable at pytorch.org/memory_viz)",
        ),
    ]


@section("health")
@dataclasses.dataclass(frozen=True)
class HealthSection:
    """Training health, decided where the step metrics are read back (every monitor.log_every steps; with
    log_every=1 at every step). A step whose loss or gradient norm is not finite is skipped (no parameter or
    optimizer change; an fp16 overflow the loss scaler absorbs is routine and not counted here); while the last
    step read back was skipped no checkpoint is saved. See docs/troubleshooting.md."""

    max_skipped_steps: Annotated[
        int,
        key(
            3,
            "stop the run (exit code 3) when this many steps in a row were skipped on a non-finite loss or gradient "
            "norm; 0: never stop",
            minimum=0,
        ),
    ]
    spike_factor: Annotated[
        float,
        key(
            2.0,
            "a loss above spike_factor * (mean of the previous spike_window losses) is a spike: logged, counted "
            "(metrics loss_spikes); 0: no spike detection",
            minimum=0,
        ),
    ]
    spike_window: Annotated[
        int,
        key(
            100,
            "steps in the moving average of the loss (non-skipped, non-spike steps); detection starts once it is full",
            minimum=1,
        ),
    ]
    rollback: Annotated[
        bool,
        key(
            False,
            "on a spike, or on max_skipped_steps skipped steps in a row, reload the newest healthy checkpoint before "
            "the offending steps and skip their batches (recorded as data.skip_batches in later checkpoints)",
        ),
    ]


__all__ = ["MonitorSection", "ProfileSection", "HealthSection"]
