"""InternLM-format config files: ``_base_`` inheritance, ``--set`` overrides, schema, defaults, checks.

    from internlm.config import load_config, load_run_config, model_config_from
    cfg = load_config("configs/7B_sft.py", overrides=["model.num_layers=4"])   # resolved `Config` dict
    cfg.data.seq_len, cfg["adam"]["lr"]
    model = InternLM(model_config_from(cfg))

    run = load_run_config("configs/7B_sft.py")        # the same, as a frozen typed `RunConfig`
    run.parallel.tensor.size, run.model_config, run.layout(world_size)

One config, in the shapes each reader needs (each made once, from the one before):

- the file's names, a plain dict: `loader` merges ``_base_`` files and ``--set`` overrides into it; it never leaves
  the loader.
- `Config`, the resolved dict (`load_config`): every key present, defaults and derived values filled, checked;
  it keeps the free UPPER_CASE constants. It is what is written (`dump_config`, ``config_{phase}.py``) and
  fingerprinted, and what dict-minded code (data workers, pickling) reads.
- `RunConfig`, the typed frozen view of a `Config` (`load_run_config`, `RunConfig.from_config`): what the trainer
  reads, ``run.data.seq_len``, with ``run.raw`` the `Config` behind it.
- `InternLMConfig` (`internlm.model`), the model's own shape, mapped from the model section (`model_config_from`,
  ``run.model_config``): the model never imports this package.

Every key is declared once, as a field of its section class (`internlm.config.sections`; the top-level names in
`RunConfig`) with its type, default, doc and checks (`internlm.config.keys.key`); `internlm.config.schema` reads
them into the tree that validation and docs/config.md use.
"""

from .container import Config
from .dump import dump_config
from .errors import ConfigError
from .keys import section_from
from .loader import load_config, load_run_config
from .model_config import CONFIG_KEY_OF_FIELD, model_config_from
from .overrides import parse_overrides
from .run_config import RunConfig
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
