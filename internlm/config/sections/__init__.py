"""The config sections, one frozen dataclass per section, one field per key (declared with `keys.key`).

    data = section_from(DataSection, load_config(path)["data"])   # internlm.config.keys.section_from
    data.seq_len, data.micro_bsz

One module per part of a run: model.py, data.py, parallel.py (with its tensor, pipeline and zero1 sections),
optim.py (adam, schedulers, ZeRO optimizer, loss scaling, loss), ckpt.py, monitor.py (monitor, profile, health),
phase.py and evaluation.py. `internlm.config.RunConfig` holds them all, with the top-level keys.
"""

from .ckpt import CkptSection
from .data import DataSection
from .evaluation import EvaluationSection
from .model import ModelSection
from .monitor import HealthSection, MonitorSection, ProfileSection
from .optim import (
    AdamSection,
    Beta2SchedulerSection,
    Fp16Section,
    GradScalerSection,
    HybridZeroOptimizerSection,
    LossSection,
    LRSchedulerSection,
)
from .parallel import ParallelSection, PipelineSection, TensorSection, Zero1Section
from .phase import PhaseSection

__all__ = [
    "ModelSection",
    "DataSection",
    "ParallelSection",
    "TensorSection",
    "PipelineSection",
    "Zero1Section",
    "AdamSection",
    "LRSchedulerSection",
    "Beta2SchedulerSection",
    "HybridZeroOptimizerSection",
    "GradScalerSection",
    "Fp16Section",
    "LossSection",
    "CkptSection",
    "MonitorSection",
    "ProfileSection",
    "PhaseSection",
    "HealthSection",
    "EvaluationSection",
]
