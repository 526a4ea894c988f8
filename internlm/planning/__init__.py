"""The planner: what a layout costs before anything runs. Each number has one function that every caller uses:

    params         parameters per layer and per pipeline stage (replicated kv heads counted)
    recompute      ``model.checkpoint`` settings: layers recomputed, selective modes, command-line parsing
    activations    bytes saved for backward per layer / embedding / head, the attention backend planned for
    memory         peak memory per device over the pipeline schedule's own op order
    communication  bytes sent per step per parallel dimension; checkpoint size
    devices        the one device table: dense bf16 peaks (MFU), memory and links for the planner
    step_time      step time, MFU and the `Estimate` of a layout
    candidates     the layouts of a device count that keep the global batch; the checkpoint settings to try
    startup        the start-up estimate of `train.py --dry-run`
    report         what `tools/plan.py` prints

Layout text comes from `internlm.parallel.Layout.describe`. The planner imports the model and the parallel
packages, never `internlm.train` (which imports it: `--dry-run`, the banner's MFU peak, activation checkpointing).
"""

from .activations import planned_attn_backend
from .candidates import CHECKPOINT_CANDIDATES, candidate_layouts
from .communication import StepCommunication, checkpoint_bytes, step_communication
from .devices import PEAK_TFLOPS, PLANNER_DEVICES, Device, peak_tflops, peak_tflops_of_name, probe_cpu_tflops
from .memory import StageMemory, memory_per_device, peak_stage, stage_memory
from .params import dtype_bytes, layer_params, most_loaded_stage_params, stage_params
from .recompute import Checkpoint, checkpoint_text, checkpointed_layer_count, parse_checkpoint, selective_mode
from .startup import StartupProbe, measure_startup, startup_estimate
from .step_time import Batch, Estimate, Hardware, estimate, step_time

__all__ = [
    "planned_attn_backend",
    "CHECKPOINT_CANDIDATES",
    "candidate_layouts",
    "StepCommunication",
    "checkpoint_bytes",
    "step_communication",
    "PEAK_TFLOPS",
    "PLANNER_DEVICES",
    "Device",
    "peak_tflops",
    "peak_tflops_of_name",
    "probe_cpu_tflops",
    "StageMemory",
    "memory_per_device",
    "peak_stage",
    "stage_memory",
    "dtype_bytes",
    "layer_params",
    "most_loaded_stage_params",
    "stage_params",
    "Checkpoint",
    "checkpoint_text",
    "checkpointed_layer_count",
    "parse_checkpoint",
    "selective_mode",
    "StartupProbe",
    "measure_startup",
    "startup_estimate",
    "Batch",
    "Estimate",
    "Hardware",
    "estimate",
    "step_time",
]
