"""InternLM-format config files: ``_base_`` inheritance, ``--set`` overrides, schema, defaults, checks.

    from internlm.config import load_config, model_config_from
    cfg = load_config("configs/7B_sft.py", overrides=["model.num_layers=4"])
    cfg.data.seq_len, cfg["adam"]["lr"]
    model = InternLM(model_config_from(cfg))

docs/config.md describes every key; `internlm.config.schema` is its source.
"""

from .container import Config
from .dump import dump_config
from .errors import ConfigError
from .loader import load_config
from .model_config import model_config_from
from .overrides import parse_overrides
from .schema import ROOT as SCHEMA

__all__ = ["load_config", "Config", "ConfigError", "model_config_from", "dump_config", "parse_overrides", "SCHEMA"]
