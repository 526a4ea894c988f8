"""`model_config_from`: the model part of a resolved config as an `InternLMConfig`."""

from __future__ import annotations

from typing import Any, Mapping

from internlm.model.config import PRESETS, InternLMConfig, parse_dtype

# config key -> InternLMConfig field, where InternLM's name differs from the model's
_RENAMED = {"layer_norm_epsilon": "norm_eps"}
_SHAPE_KEYS = (
    "vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_kv_attention_heads", "mlp_ratio",
    "multiple_of", "max_position_embeddings", "rope_base", "layer_norm_epsilon", "qkvo_bias", "init_std",
)


def model_config_from(cfg: Mapping[str, Any]) -> InternLMConfig:
    """Build the `InternLMConfig` described by ``cfg["model"]`` (a resolved config from `load_config`).

    The preset fills keys the model section lacks, ``max_position_embeddings`` defaults to
    ``data.seq_len``, ``dtype`` strings are parsed, and ``use_flash_attn=False`` turns
    ``attn_backend="auto"`` into ``"sdpa"``. Raises ValueError for an inconsistent shape.
    """
    model = dict(cfg["model"])
    preset = PRESETS.get(model.get("preset") or "", {})
    values = {}
    for key in _SHAPE_KEYS:
        field = _RENAMED.get(key, key)
        if model.get(key) is not None:
            values[field] = model[key]
        elif field in preset:
            values[field] = preset[field]
    if "max_position_embeddings" not in values and "data" in cfg:
        values["max_position_embeddings"] = cfg["data"]["seq_len"]
    backend = model.get("attn_backend", "auto")
    if backend == "auto" and model.get("use_flash_attn", True) is False:
        backend = "sdpa"
    values["attn_backend"] = backend
    values["dtype"] = parse_dtype(model.get("dtype", "torch.bfloat16"))
    return InternLMConfig(**values)
