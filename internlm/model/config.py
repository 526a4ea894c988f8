"""InternLM model hyper-parameters, named presets, parameter and FLOP counts.

`InternLMConfig` is a plain dataclass: it needs no process group and no device, so research code can
build, inspect and size any preset (even the 104B one) without allocating memory.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

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


@dataclass
class InternLMConfig:
    """Shape and numerics of an InternLM decoder.

    The MLP hidden size is ``mlp_ratio * hidden_size`` rounded up to a multiple of ``multiple_of``
    (256), which gives 11008 for the 7B model (4096 * 8/3 = 10922.7 -> 11008).
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

    def __post_init__(self) -> None:
        self._normalize()
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(str(p) for p in problems))

    def _normalize(self) -> None:
        self.dtype = parse_dtype(self.dtype)
        if self.num_kv_attention_heads is None:
            self.num_kv_attention_heads = self.num_attention_heads

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

    @property
    def intermediate_size(self) -> int:
        raw = int(math.ceil(self.mlp_ratio * self.hidden_size))
        return self.multiple_of * ((raw + self.multiple_of - 1) // self.multiple_of)

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
        for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_kv_attention_heads"):
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
        out = dataclasses.asdict(self)
        out["dtype"] = str(self.dtype)
        return out

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


PRESETS: Dict[str, Dict[str, Any]] = {
    "internlm-7b": dict(hidden_size=4096, num_layers=32, num_attention_heads=32, vocab_size=103168),
    "internlm-20b": dict(
        hidden_size=5120, num_layers=60, num_attention_heads=40, vocab_size=103168, max_position_embeddings=4096
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

__all__ = ["InternLMConfig", "PRESETS", "parse_dtype"]
