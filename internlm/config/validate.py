"""Defaults that depend on other keys, and the relations between keys.

Parallel layout checks that need the world size (tensor * pipeline dividing it, zero1 dividing the
data-parallel size) belong to the launcher, not here.
"""

from __future__ import annotations

import os
from typing import Any, Dict

from internlm.model.config import InternLMConfig

from .compat import check_compat
from .errors import ConfigError
from .model_config import config_key, model_config_values


def fill_derived(cfg: Dict[str, Any], stem: str) -> None:
    """Resolve, in place, every ``None`` default that stands for another key's value."""
    model, data = cfg["model"], cfg["data"]
    if cfg["work_dir"] is None:
        cfg["work_dir"] = f"work_dirs/{cfg['JOB_NAME']}"
    if model["max_position_embeddings"] is None:
        model["max_position_embeddings"] = data["seq_len"]
    if model["num_kv_attention_heads"] is None:
        model["num_kv_attention_heads"] = model["num_attention_heads"]
    if model["intermediate_size"] is None:  # mlp_ratio * hidden_size rounded up to multiple_of
        model["intermediate_size"] = InternLMConfig.unchecked(**model_config_values(model)).intermediate_size
    if cfg["parallel"]["tensor"]["sp"] == "megatron":  # InternLM's spelling of Megatron sequence parallelism
        cfg["parallel"]["sequence_parallel"] = True
    if model["attn_backend"] == "auto" and not model["use_flash_attn"]:
        model["attn_backend"] = "sdpa"
    if cfg["lr_scheduler"]["total_steps"] is None:
        cfg["lr_scheduler"]["total_steps"] = data["total_steps"]  # still None under a token budget
    beta2 = cfg["beta2_scheduler"]
    if beta2["init_beta2"] is None:
        beta2["init_beta2"] = cfg["adam"]["adam_beta2"]
    if beta2["c"] is None:
        beta2["c"] = cfg["adam"]["adam_beta2_c"]
    if cfg["ckpt"]["save_ckpt_folder"] is None:
        cfg["ckpt"]["save_ckpt_folder"] = os.path.join(cfg["work_dir"], "checkpoints")
    if cfg["phase"]["name"] is None:
        cfg["phase"]["name"] = stem


def validate(cfg: Dict[str, Any]) -> None:
    """Raise ConfigError for the first pair of keys whose values contradict each other."""
    model, data = cfg["model"], cfg["data"]
    heads, kv_heads = model["num_attention_heads"], model["num_kv_attention_heads"]
    if model["hidden_size"] % heads:
        raise ConfigError(
            "model.hidden_size", f"{model['hidden_size']} is not divisible by model.num_attention_heads={heads}"
        )
    if heads % kv_heads:
        raise ConfigError(
            "model.num_attention_heads", f"{heads} is not divisible by model.num_kv_attention_heads={kv_heads}"
        )
    if model["attn_backend"] == "flash" and not model["use_flash_attn"]:
        raise ConfigError("model.attn_backend", "'flash' contradicts model.use_flash_attn=False; drop one of them")
    if cfg["lr_scheduler"]["eta_min"] > cfg["adam"]["lr"]:
        raise ConfigError(
            "lr_scheduler.eta_min", f"{cfg['lr_scheduler']['eta_min']!r} exceeds adam.lr={cfg['adam']['lr']!r}"
        )
    steps, tokens = data["total_steps"], data["total_tokens"]
    if steps is None and tokens is None:
        raise ConfigError("data.total_steps", "set data.total_steps or data.total_tokens to a positive number")
    if steps is not None and tokens is not None:
        raise ConfigError("data.total_tokens", "set only one of data.total_steps and data.total_tokens")
    check_compat(cfg)
    problems = InternLMConfig.unchecked(**model_config_values(model)).problems()
    if problems:
        # InternLMConfig names its fields; report the config key of the first problem
        raise ConfigError(f"model.{config_key(problems[0].key)}", problems[0].message)
