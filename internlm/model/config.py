"""InternLM model hyper-parameters, named presets, parameter and FLOP counts.

`InternLMConfig` is a plain dataclass: it needs no process group and no device, so research code can
build, inspect and size any preset (even the 104B one) without allocating memory.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

import torch

from internlm.problems import Problem

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(value: Any) -> torch.dtype:
    """Accept a torch.dtype or InternLM's string spellings ("torch.bfloat16", "bf16", "float32")."""
    if isinstance(value, torch.dtype):
        return value
    name = str(value).replace("torch.", "")
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {value!r}; use one of torch.float32, torch.bfloat16, torch.float16")
    return _DTYPES[name]


ROPE_SCALING_TYPES = ("dynamic", "linear")


def normalize_rope_scaling(value: Any) -> Optional[Dict[str, Any]]:
    """``None`` or the canonical ``{"type": "dynamic" | "linear", "factor": float}`` of a Hugging Face style
    ``rope_scaling`` dict (``"rope_type"`` is accepted for ``"type"``); raises ValueError naming the problem.

    dynamic (NTK, as transformers' Llama): for a forward whose longest sequence L exceeds max_position_embeddings M,
    base' = base * (factor * L / M - (factor - 1)) ** (D / (D - 2)), D = head_dim; unchanged for L <= M.
    linear: every position is divided by ``factor`` (inv_freq / factor).
    """
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(
            f"rope_scaling must be None or a dict like {{'type': 'dynamic', 'factor': 2.0}}, got {value!r}"
        )
    rest = dict(value)
    kind = rest.pop("type", None)
    alias = rest.pop("rope_type", None)
    kind = alias if kind is None else kind
    if kind not in ROPE_SCALING_TYPES:
        raise ValueError(
            f"rope_scaling type {kind!r} is not supported; use one of {', '.join(ROPE_SCALING_TYPES)} (or None)"
        )
    factor = rest.pop("factor", None)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
        raise ValueError(f"rope_scaling factor must be a positive number, got {factor!r}")
    if rest:
        raise ValueError(f"rope_scaling has unknown keys {', '.join(sorted(map(str, rest)))}; only type and factor")
    return {"type": kind, "factor": float(factor)}


@dataclass
class InternLMConfig:
    """Shape and numerics of an InternLM decoder.

    The MLP hidden size ``intermediate_size``, when not given (None), is ``mlp_ratio * hidden_size`` rounded up to
    a multiple of ``multiple_of`` (256), which gives 11008 for the 7B model (4096 * 8/3 = 10922.7 -> 11008); it is
    resolved at construction, like ``num_kv_attention_heads`` (so ``dataclasses.replace`` keeps the resolved value).
    ``rope_scaling``: None or ``{"type": "dynamic" | "linear", "factor": F}`` (`normalize_rope_scaling`).
    """

    vocab_size: int = 103168
    hidden_size: int = 4096
    num_layers: int = 32
    num_attention_heads: int = 32
    num_kv_attention_heads: Optional[int] = None  # None: multi-head attention (kv heads = heads)
    mlp_ratio: float = 8 / 3
    multiple_of: int = 256
    max_position_embeddings: int = 2048
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    qkvo_bias: bool = True  # InternLM-7B has biases on q, k, v and o; the MLP has none
    init_std: float = 0.02
    dtype: torch.dtype = torch.float32
    attn_backend: str = "auto"  # auto | flash | sdpa | reference
    intermediate_size: Optional[int] = None  # None: mlp_ratio * hidden_size rounded up to multiple_of
    rope_scaling: Optional[Dict[str, Any]] = None  # None | {"type": "dynamic" | "linear", "factor": F}

    def __post_init__(self) -> None:
        self._normalize()
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(str(p) for p in problems))

    def _normalize(self) -> None:
        self.dtype = parse_dtype(self.dtype)
        if self.num_kv_attention_heads is None:
            self.num_kv_attention_heads = self.num_attention_heads
        if self.intermediate_size is None and self.multiple_of > 0:
            raw = int(math.ceil(self.mlp_ratio * self.hidden_size))
            self.intermediate_size = self.multiple_of * ((raw + self.multiple_of - 1) // self.multiple_of)
        try:
            self.rope_scaling = normalize_rope_scaling(self.rope_scaling)
        except ValueError:
            pass  # reported by problems()

    @classmethod
    def unchecked(cls, **values: Any) -> "InternLMConfig":
        """A config of ``values`` (defaults for the rest) that does not raise for its `problems()`.

        For validation that reports the problems itself, e.g. `internlm.config` naming the config key.
        """
        config = cls.__new__(cls)
        for field in dataclasses.fields(cls):
            setattr(config, field.name, values.pop(field.name, field.default))
        if values:
            raise TypeError(f"unknown InternLMConfig fields: {', '.join(sorted(values))}")
        config._normalize()
        return config

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.num_kv_attention_heads

    def problems(self) -> List[Problem]:
        """Inconsistencies, each keyed by the field to change; empty when the config is usable."""
        out = []
        heads, kv_heads = self.num_attention_heads, self.num_kv_attention_heads
        if heads > 0 and self.hidden_size % heads:
            out.append(Problem("hidden_size", f"{self.hidden_size} is not divisible by num_attention_heads={heads}"))
        elif heads > 0 and self.head_dim % 2:
            out.append(Problem("hidden_size", f"head dimension {self.head_dim} must be even for rotary embedding"))
        if kv_heads > 0 and heads % kv_heads:
            out.append(Problem("num_kv_attention_heads", f"{kv_heads} does not divide num_attention_heads={heads}"))
        if self.attn_backend not in ("auto", "flash", "sdpa", "reference"):
            out.append(Problem("attn_backend", f"{self.attn_backend!r} is not one of auto, flash, sdpa, reference"))
        try:
            normalize_rope_scaling(self.rope_scaling)
        except ValueError as err:
            out.append(Problem("rope_scaling", str(err)))
        names = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_kv_attention_heads")
        if self.intermediate_size is None:  # not derivable: multiple_of <= 0
            out.append(Problem("multiple_of", f"must be positive to derive intermediate_size, got {self.multiple_of}"))
        else:
            names += ("intermediate_size",)
        for name in names:
            if getattr(self, name) <= 0:
                out.append(Problem(name, f"must be positive, got {getattr(self, name)}"))
        return out

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "InternLMConfig":
        """A named model flavor, e.g. ``InternLMConfig.preset("internlm-7b", num_layers=2)``."""
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        values = dict(PRESETS[name])
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> Dict[str, Any]:
        """Every field, JSON-ready (dtype as its string, e.g. "torch.bfloat16"); `from_dict` reads it back."""
        out = dataclasses.asdict(self)
        out["dtype"] = str(self.dtype)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "InternLMConfig":
        """The config of a `to_dict` dict (e.g. a checkpoint's meta.json ``model_config``). Fields it lacks take
        their defaults, so dicts written before a field existed still load (``intermediate_size`` None: derived
        from mlp_ratio / multiple_of; ``rope_scaling`` None: plain rotary)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown InternLMConfig fields {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**dict(values))

    # ------------------------------------------------------------------ counts
    def num_params(self, include_embedding: bool = True) -> int:
        """Exact parameter count of `InternLM(self)` (untied embedding and output head)."""
        h, kv, f, v = self.hidden_size, self.kv_dim, self.intermediate_size, self.vocab_size
        bias = 1 if self.qkvo_bias else 0
        attention = h * h + 2 * h * kv + h * h + bias * (h + 2 * kv + h)
        mlp = 3 * h * f
        norms = 2 * h
        per_layer = attention + mlp + norms
        total = self.num_layers * per_layer + h + v * h  # + final norm + output head
        if include_embedding:
            total += v * h
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), recomputation never counted.

        Matrix multiplies: 2 FLOPs per multiply-add, so a forward pass costs 2 * N_matmul per token,
        where N_matmul counts every weight used in a matmul (all layers and the output head, not the
        embedding lookup). Causal attention adds QK^T and AV: 2 * 2 * seq_len * hidden per layer per
        token for the full square, halved because a causal token attends on average to seq_len / 2
        keys. Total: 3 * (2 * N_matmul + 2 * num_layers * seq_len * hidden).
        """
        n_matmul = self.num_params(include_embedding=False) - (2 * self.num_layers + 1) * self.hidden_size
        if self.qkvo_bias:
            n_matmul -= self.num_layers * (2 * self.hidden_size + 2 * self.kv_dim)
        attention = 2 * self.num_layers * seq_len * self.hidden_size
        return 3.0 * (2.0 * n_matmul + attention)

    # ------------------------------------------------------------------ Hugging Face (internlm/model/hf.py)
    @classmethod
    def from_hf(cls, dict_or_path: Any, **overrides: Any) -> "InternLMConfig":
        """The config of a Hugging Face ``config.json`` (a dict, the file or its folder): ``LlamaForCausalLM`` or
        InternLM's published ``InternLMForCausalLM`` layout; ``overrides`` replace fields (e.g. ``dtype``)."""
        from .hf import config_values_from_hf

        return cls(**{**config_values_from_hf(dict_or_path), **overrides})

    def to_hf(self, dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
        """This config as the ``config.json`` dict of ``transformers``' ``LlamaForCausalLM`` (``attention_bias`` =
        ``qkvo_bias``, GQA, norm epsilon, rope base and scaling carried)."""
        from .hf import config_to_hf

        return config_to_hf(self, dtype)


PRESETS: Dict[str, Dict[str, Any]] = {
    # as published on the Hugging Face hub (internlm/internlm-7b, internlm/internlm-20b config.json): 7B has q/k/v/o
    # biases ("bias": true), 20B none ("bias": false); both use InternLM's dynamic NTK rotary ("rotary": {"base":
    # 10000, "type": "dynamic"}, scaling factor 1.0) beyond max_position_embeddings
    "internlm-7b": dict(
        hidden_size=4096,
        num_layers=32,
        num_attention_heads=32,
        vocab_size=103168,
        max_position_embeddings=2048,
        rope_scaling={"type": "dynamic", "factor": 1.0},
    ),
    "internlm-20b": dict(
        hidden_size=5120,
        num_layers=60,
        num_attention_heads=40,
        vocab_size=103168,
        max_position_embeddings=4096,
        qkvo_bias=False,
        rope_scaling={"type": "dynamic", "factor": 1.0},
    ),
    "internlm-104b": dict(
        hidden_size=10240, num_layers=82, num_attention_heads=80, vocab_size=65536, max_position_embeddings=2048
    ),
    # small flavors for tests, demos and CPU development
    "internlm-tiny": dict(hidden_size=64, num_layers=2, num_attention_heads=4, vocab_size=256, multiple_of=16),
    "internlm-small": dict(
        hidden_size=256,
        num_layers=4,
        num_attention_heads=8,
        vocab_size=2048,
        multiple_of=64,
        max_position_embeddings=512,
    ),
}

__all__ = ["InternLMConfig", "PRESETS", "ROPE_SCALING_TYPES", "normalize_rope_scaling", "parse_dtype"]
