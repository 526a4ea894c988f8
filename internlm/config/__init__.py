"""InternLM-format config files: ``_base_`` inheritance, ``--set`` overrides, schema, defaults, checks.

    from internlm.config import load_config, load_run_config, model_config_from
    cfg = load_config("configs/7B_sft.py", overrides=["model.num_layers=4"])   # resolved `Config` dict
    cfg.data.seq_len, cfg["adam"]["lr"]
    model = InternLM(model_config_from(cfg))

    run = load_run_config("configs/7B_sft.py")        # the same, as a frozen typed `RunConfig`
    run.parallel.tensor.size, run.model_config, run.layout(world_size)

docs/config.md describes every key; `internlm.config.schema` is its source.
"""

from .container import Config
from .dump import dump_config
from .errors import ConfigError
from .loader import load_config
from .model_config import CONFIG_KEY_OF_FIELD, model_config_from
from .overrides import parse_overrides
from .run_config import RunConfig, load_run_config
from .schema import ROOT as SCHEMA
from .sections import (
    AdamSection,
    Beta2SchedulerSection,
    CkptSection,
    DataSection,
    Fp16Section,
    GradScalerSection,
    HealthSection,
    HybridZeroOptimizerSection,
    LossSection,
    LRSchedulerSection,
    ModelSection,
    MonitorSection,
    ParallelSection,
    PhaseSection,
    PipelineSection,
    ProfileSection,
    TensorSection,
    Zero1Section,
    section_from,
)

__all__ = [
    "load_config",
    "load_run_config",
    "RunConfig",
    "Config",
    "ConfigError",
    "model_config_from",
    "CONFIG_KEY_OF_FIELD",
    "dump_config",
    "parse_overrides",
    "SCHEMA",
    "section_from",
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
]
