"""The InternLM model, usable on its own: no process group, CPU or GPU.

from internlm.model import InternLM, InternLMConfig
model = InternLM(InternLMConfig.preset("internlm-tiny"))
logits = model(input_ids)                      # (batch, seq, vocab)
logits = model(packed_ids, cu_seqlens=cu)      # packed documents, shape (1, total_tokens)
loss = model(input_ids, labels=labels)         # mean next-token cross-entropy, shifted inside (transformers')
rows = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=16, temperature=0)  # KV cache, batched
logits = model.decode(new_ids, cache, attention_mask=mask)  # one generation step over a KVCache (padded rows)
"""

from .attention import PackedDocs, flash_attn_available, packed_causal_attention, positions_from_cu_seqlens
from .config import PRESETS, InternLMConfig, parse_dtype
from .generate import generate
from .kv_cache import KVCache
from .modeling import Attention, AttentionCore, DecoderLayer, HeadInput, InternLM, RMSNorm, SwiGLU

__all__ = [
    "InternLM",
    "InternLMConfig",
    "PRESETS",
    "parse_dtype",
    "generate",
    "KVCache",
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
