"""The ``model`` section: model shape and numerics, the keys of `InternLMConfig` plus training switches.

A key that is an `InternLMConfig` field takes that field's default (`model_default`), so the model, the lower
layer, holds the one default. Two keys differ on purpose: ``max_position_embeddings`` defaults to None (resolved to
the preset's value, else data.seq_len) and ``dtype`` to torch.bfloat16, the training precision, where a hand-built
`InternLMConfig` is float32 for exact CPU work.
"""

import dataclasses
from typing import Annotated, Any, Dict, Optional, Union

import torch

from internlm.model.config import InternLMConfig, normalize_rope_scaling, parse_dtype

from ..keys import FIXED, key, section
from ..model_config import config_key

SELECTIVE_CHECKPOINT = ("attn", "mlp")

_MODEL_DEFAULTS = {config_key(f.name): f.default for f in dataclasses.fields(InternLMConfig)}


def model_default(name: str) -> Any:
    """The default of the model-section key ``name``: that of its `InternLMConfig` field."""
    return _MODEL_DEFAULTS[name]


def _canonical_dtype(value: Any) -> str:
    return str(parse_dtype(value))  # "bf16", "bfloat16", torch.bfloat16 -> "torch.bfloat16"


def _checkpoint_mode(value: Any) -> Any:
    # True/False, a fraction of layers (range-checked by minimum/maximum), or a selective mode
    if isinstance(value, str):
        mode = value.strip().lower()
        if mode not in SELECTIVE_CHECKPOINT:
            raise ValueError(f"{value!r} is not a checkpoint mode; use True, False, a fraction, 'attn' or 'mlp'")
        return mode
    return value


@section("model")
@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Model shape and numerics (InternLMConfig)."""

    preset: Annotated[
        Optional[str], key(None, "name from internlm.model.PRESETS; fills the shape keys not given explicitly")
    ]
    checkpoint: Annotated[
        Union[bool, float, str],
        key(
            False,
            "activation checkpointing: True/False, the fraction of layers recomputed (the first ones of every "
            "model chunk), or a selective mode for every layer: 'attn' (recompute attention's core only) or "
            "'mlp' (recompute the MLP only)",
            minimum=0,
            maximum=1,
            normalize=_checkpoint_mode,
        ),
    ]
    compile: Annotated[
        bool, key(False, "compile every decoder layer with torch.compile (inductor; the attention core stays eager)")
    ]
    fused_loss: Annotated[
        bool,
        key(
            True,
            "output head + cross-entropy fused and chunked over tokens on the last pipeline stage (the full logits "
            "are never materialised); False: lm_head logits, then the (vocab-parallel) cross-entropy",
        ),
    ]
    num_attention_heads: Annotated[int, key(model_default("num_attention_heads"), "attention (query) heads", minimum=1)]
    num_kv_attention_heads: Annotated[
        Optional[int],
        key(
            model_default("num_kv_attention_heads"),
            "key/value heads for grouped-query attention; None resolves to num_attention_heads",
            minimum=1,
        ),
    ]
    hidden_size: Annotated[int, key(model_default("hidden_size"), "model width", minimum=1)]
    num_layers: Annotated[int, key(model_default("num_layers"), "decoder layers", minimum=1)]
    mlp_ratio: Annotated[
        float,
        key(
            model_default("mlp_ratio"),
            "MLP width / hidden_size before rounding up to multiple_of",
            minimum=0,
            default_text="8 / 3",
        ),
    ]
    multiple_of: Annotated[
        int, key(model_default("multiple_of"), "MLP width is rounded up to a multiple of this", minimum=1)
    ]
    intermediate_size: Annotated[
        Optional[int],
        key(
            model_default("intermediate_size"),
            "MLP width given directly; None: mlp_ratio * hidden_size rounded up to multiple_of",
            minimum=1,
        ),
    ]
    vocab_size: Annotated[
        int, key(model_default("vocab_size"), "vocabulary size (embedding and output head rows)", minimum=1)
    ]
    dtype: Annotated[
        str,
        key(
            "torch.bfloat16",  # not InternLMConfig's float32: training runs in bf16 unless a config says otherwise
            "parameter and compute dtype: torch.float32, torch.bfloat16 or torch.float16",
            normalize=_canonical_dtype,
            accepts=(str, torch.dtype),
        ),
    ]
    norm_type: Annotated[str, key("rmsnorm", "normalisation layer", choices=("rmsnorm",))]
    layer_norm_epsilon: Annotated[float, key(model_default("layer_norm_epsilon"), "RMSNorm epsilon", minimum=0)]
    rope_base: Annotated[float, key(model_default("rope_base"), "rotary embedding base", minimum=0)]
    rope_scaling: Annotated[
        Optional[Dict[str, Any]],
        key(
            model_default("rope_scaling"),
            "rotary scaling as in Hugging Face configs: None, {'type': 'dynamic', 'factor': F} (NTK: beyond "
            "max_position_embeddings M a forward of longest sequence L uses base * (F * L / M - (F - 1)) ** "
            "(D / (D - 2))) or {'type': 'linear', 'factor': F} (positions / F); the 7B and 20B presets: dynamic, 1.0",
            normalize=normalize_rope_scaling,
        ),
    ]
    max_position_embeddings: Annotated[
        Optional[int],
        key(
            None,  # not InternLMConfig's 2048: derived from the preset or data.seq_len (internlm.config.validate)
            "longest sequence the model is built for; None resolves to the preset's value, else data.seq_len",
            minimum=1,
        ),
    ]
    use_flash_attn: Annotated[bool, key(True, "InternLM's switch; False with attn_backend='auto' selects sdpa")]
    attn_backend: Annotated[
        str,
        key(
            model_default("attn_backend"),
            "attention kernel: auto (flash if installed, else sdpa), flash, sdpa or reference",
            choices=("auto", "flash", "sdpa", "reference"),
        ),
    ]
    init_std: Annotated[
        float, key(model_default("init_std"), "standard deviation of the normal weight initialisation", minimum=0)
    ]
    qkvo_bias: Annotated[
        bool, key(model_default("qkvo_bias"), "bias on the q, k, v and o projections (InternLM-7B has them)")
    ]
    num_chunks: Annotated[
        int,
        key(
            1,
            "model chunks (virtual pipeline stages) per pipeline rank; >1 selects the interleaved schedule",
            minimum=1,
        ),
    ]
    embed_split_hidden: Annotated[bool, key(True, "InternLM compatibility; only True", compat=FIXED)]
    embed_grad_scale: Annotated[float, key(1.0, "InternLM compatibility; only 1", compat=FIXED)]
    parallel_output: Annotated[
        bool, key(True, "InternLM compatibility; only True (logits stay vocab-parallel into the loss)", compat=FIXED)
    ]
    apply_post_layer_norm: Annotated[bool, key(False, "InternLM compatibility; only False (pre-norm)", compat=FIXED)]


__all__ = ["ModelSection", "SELECTIVE_CHECKPOINT", "model_default"]
