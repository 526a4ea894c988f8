"""Context parallelism: attention of a packed sequence split across the ranks of the context group.

    shard = ContextShard.build(docs, cp_group, mode="ring")   # once per micro-batch, from the global boundaries
    x_local = shard.take(x)                                    # this rank's tokens (zigzag or contiguous)
    out = context_attention(q, k, v, shard, cp_group)          # (T_local, Hq, D), as one process's rows
    core = ContextAttentionCore(cp_group)                      # replaces the model's AttentionCore

Modules: `zigzag` (which tokens a rank holds), `shard` (`ContextShard`), `block` (one block's attention, online
softmax merge, flash backward), `ring` (ring attention), `a2a` (all-to-all over heads), `attention` (dispatch),
`traffic` (bytes sent per layer).
See docs/context_parallel.md.
"""

from .a2a import a2a_attention, kv_replication
from .attention import ContextAttentionCore, context_attention
from .ring import ring_attention
from .shard import BlockPair, ContextShard
from .traffic import AttentionTraffic, context_attention_bytes
from .zigzag import (
    MODES,
    check_divisible,
    contiguous_index,
    contiguous_ranges,
    restore_order,
    shard_index,
    shard_ranges,
    zigzag_index,
    zigzag_ranges,
)

__all__ = [
    "MODES",
    "AttentionTraffic",
    "BlockPair",
    "ContextShard",
    "ContextAttentionCore",
    "a2a_attention",
    "check_divisible",
    "contiguous_index",
    "contiguous_ranges",
    "context_attention",
    "context_attention_bytes",
    "kv_replication",
    "restore_order",
    "ring_attention",
    "shard_index",
    "shard_ranges",
    "zigzag_index",
    "zigzag_ranges",
]
