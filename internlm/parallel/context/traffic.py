"""Bytes one rank of the context group sends for the attention of one layer and one micro-batch.

The formulas of docs/context_parallel.md, in one place for the planner and the tests (which measure them on gloo).
With ``t`` tokens per rank, ``C`` ranks, ``Hq`` / ``Hkv`` the heads this rank holds after tensor parallelism, ``D``
the head dimension, ``b`` bytes per element of the model dtype, ``a = max(4, b)`` bytes of the accumulation dtype
and ``L = lcm(Hkv, C)``:

    ring  forward   (C-1) 2 t Hkv D b                        k and v, C-1 hops
          backward  (C-1) 2 t Hkv D b + C 2 t Hkv D a          k and v again, dK and dV in fp32, C hops
    a2a   forward   (C-1)/C t (Hq + 2 L) D b + (C-1)/C t Hq D b  q, k, v in; the output back
          backward  the same as the forward                    the inverse all-to-alls

Recomputing the attention core alone (``model.checkpoint="attn"``) sends again, in the backward (``recompute``): for
ring the whole forward (the ring's autograd Function saves its inputs, so all of it runs again); for a2a only the
q, k, v all-to-all, ``(C-1)/C t (Hq + 2 L) D b``: torch's non-reentrant checkpoint stops the recomputation at the
last tensor the backward needs, and the output all-to-all saves none. Recomputing a whole layer reruns the forward's
bytes in both modes (``o_proj`` saves the output of the last all-to-all).
"""

from __future__ import annotations

from typing import NamedTuple

from .a2a import kv_replication


class AttentionTraffic(NamedTuple):
    """Bytes sent by one rank for one layer's attention and one micro-batch."""

    forward: float
    backward: float
    recompute: float  # sent again in the backward when activation checkpointing recomputes the core alone


def context_attention_bytes(
    mode: str, tokens: int, size: int, q_heads: int, kv_heads: int, head_dim: int, dtype_bytes: int
) -> AttentionTraffic:
    """Bytes sent per layer and micro-batch by one rank holding ``tokens`` tokens (module docstring formulas)."""
    if size == 1:
        return AttentionTraffic(0.0, 0.0, 0.0)
    kv_block = 2 * tokens * kv_heads * head_dim  # elements of one k/v block
    if mode == "ring":
        forward = (size - 1) * kv_block * dtype_bytes
        backward = forward + size * kv_block * max(4, dtype_bytes)
        return AttentionTraffic(float(forward), float(backward), float(forward))
    if mode == "a2a":
        kv = kv_heads * kv_replication(kv_heads, size)
        share = (size - 1) / size * tokens * head_dim * dtype_bytes
        qkv, out = share * (q_heads + 2 * kv), share * q_heads
        return AttentionTraffic(qkv + out, qkv + out, qkv)
    raise ValueError(f"parallel.context_mode={mode!r} is unknown; use 'ring' or 'a2a'")


__all__ = ["AttentionTraffic", "context_attention_bytes"]
