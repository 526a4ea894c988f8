"""`model_config_from`: the model section of a resolved config as an `InternLMConfig`.

`CONFIG_KEY_OF_FIELD` is the one table of names that differ between the config (InternLM's key names) and
`InternLMConfig`; every other field has the name of its config key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping

from internlm.model.config import InternLMConfig

# InternLMConfig field -> config key of the model section, where InternLM's name differs from the model's
CONFIG_KEY_OF_FIELD: Dict[str, str] = {"norm_eps": "layer_norm_epsilon"}


def config_key(field: str) -> str:
    """The model-section config key of the `InternLMConfig` field ``field``."""
    return CONFIG_KEY_OF_FIELD.get(field, field)


def model_config_values(model: Mapping[str, Any]) -> Dict[str, Any]:
    """The `InternLMConfig` field values of a resolved model section (every key present)."""
    return {f.name: model[config_key(f.name)] for f in dataclasses.fields(InternLMConfig)}


def model_config_from(cfg: Mapping[str, Any]) -> InternLMConfig:
    """The `InternLMConfig` of ``cfg["model"]``, a resolved config from `load_config`.

    A plain mapping of keys to fields: presets, derived values (``max_position_embeddings``,
    ``num_kv_attention_heads``, ``attn_backend``) and defaults were all filled by `load_config`.
    Raises ValueError for an inconsistent shape (`load_config` has reported it already).
    """
    return InternLMConfig(**model_config_values(cfg["model"]))
