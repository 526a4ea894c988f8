"""The InternLM model, usable on its own: no process group, CPU or GPU.

from internlm.model import InternLM, InternLMConfig
model = InternLM(InternLMConfig.preset("internlm-tiny"))
logits = model(input_ids)                      # (batch, seq, vocab)
logits = model(packed_ids, cu_seqlens=cu)      # packed documents, shape (1, total_tokens)
"""

from .attention import PackedDocs, flash_attn_available, packed_causal_attention, positions_from_cu_seqlens
from .config import PRESETS, InternLMConfig, parse_dtype
from .generate import generate
from .modeling import Attention, AttentionCore, DecoderLayer, HeadInput, InternLM, RMSNorm, SwiGLU

__all__ = [
    "InternLM",
    "InternLMConfig",
    "PRESETS",
    "parse_dtype",
    "generate",
    "packed_causal_attention",
    "PackedDocs",
    "positions_from_cu_seqlens",
    "flash_attn_available",
    "Attention",
    "AttentionCore",
    "HeadInput",
    "DecoderLayer",
    "RMSNorm",
    "SwiGLU",
]
