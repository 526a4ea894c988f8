"""Key/value cache for incremental decoding with `InternLM` (the generation path; training never builds one).

A `KVCache` holds, for a batch of B rows, the rotated keys and the values of every token the model has seen, one
(B, kv_heads, T, head_dim) buffer pair per layer, and which of the T slots hold real tokens (``valid``: padding
slots are never attended to). An `InternLM.decode` call appends its S new tokens at slots [T0, T0 + S):

    query i of row b (slot T0 + i) attends key slot t  iff  t <= T0 + i  and  valid[b, t]

(also its own slot, so that a padding query stays finite; its output is meaningless and unused). Rows of different
lengths are left-padded: a row's positions count its real tokens only, ``position = tokens seen before + cumsum(mask)
- 1`` (0 for padding), as transformers' ``generate`` does, so every row is computed as if it were alone.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F


class LayerKV:
    """One layer's view of a `KVCache` during one forward: `update` stores the new keys/values and returns all."""

    def __init__(self, cache: "KVCache", name: str) -> None:
        self.cache, self.name = cache, name

    @property
    def mask(self) -> torch.Tensor:
        """(B, 1, S, T) bool: which key slots each new query may attend to."""
        return self.cache.mask

    def update(self, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """k, v: (B, S, kv_heads, head_dim) of the new tokens -> keys and values of slots [0, T0 + S), each
        (B, kv_heads, T0 + S, head_dim)."""
        return self.cache.store(self.name, k, v)


class KVCache:
    """Keys and values of the tokens seen so far, for ``model.decode(new_ids, cache, attention_mask=mask)``.

    ``batch_size`` rows; ``max_len`` slots are reserved up front (the buffers grow, by doubling, when a forward
    needs more). ``length`` is the number of slots filled (T0), ``seen`` (B,) the real tokens of each row.
    """

    def __init__(self, batch_size: int, max_len: int = 0) -> None:
        self.batch_size = batch_size
        self.capacity = max(0, int(max_len))
        self.length = 0
        self.keys: Dict[str, torch.Tensor] = {}
        self.values: Dict[str, torch.Tensor] = {}
        self.valid: Optional[torch.Tensor] = None  # (B, capacity) bool
        self.seen: Optional[torch.Tensor] = None  # (B,) long
        self.mask: Optional[torch.Tensor] = None  # (B, 1, S, T0 + S) of the forward in progress
        self._new = 0

    def _reserve(self, needed: int, device: torch.device) -> None:
        if self.valid is None:
            self.capacity = max(self.capacity, needed)
            self.valid = torch.zeros(self.batch_size, self.capacity, dtype=torch.bool, device=device)
            self.seen = torch.zeros(self.batch_size, dtype=torch.long, device=device)
            return
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity)
        grow = capacity - self.capacity
        self.valid = torch.cat([self.valid, self.valid.new_zeros(self.batch_size, grow)], dim=1)
        for table in (self.keys, self.values):
            for name, buf in table.items():
                table[name] = torch.cat([buf, buf.new_zeros(*buf.shape[:2], grow, buf.shape[3])], dim=2)
        self.capacity = capacity

    def begin(self, seq: int, attention_mask: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
        """Open a forward of ``seq`` new tokens per row (``attention_mask`` (B, seq): 1 real, 0 padding; None: all
        real). Builds the attention mask and returns the default positions (B, seq)."""
        if attention_mask is None:
            new_valid = torch.ones(self.batch_size, seq, dtype=torch.bool, device=device)
        else:
            if tuple(attention_mask.shape) != (self.batch_size, seq):
                raise ValueError(
                    f"attention_mask must be (batch, seq) = {(self.batch_size, seq)}, got {tuple(attention_mask.shape)}"
                )
            new_valid = attention_mask.to(device=device, dtype=torch.bool)
        start, total = self.length, self.length + seq
        self._reserve(total, device)
        self.valid[:, start:total] = new_valid
        slots = torch.arange(total, device=device)
        query_slots = slots[start:total]
        causal = slots[None, :] <= query_slots[:, None]  # (S, T)
        mask = causal[None] & self.valid[:, None, :total]
        mask |= (slots[None, :] == query_slots[:, None])[None]  # a padding query sees itself: no empty softmax row
        self.mask = mask[:, None]
        positions = self.seen[:, None] + new_valid.long().cumsum(-1) - 1
        self.seen = self.seen + new_valid.long().sum(-1)
        self._new = seq
        return positions.clamp(min=0)

    def layer(self, name: str) -> LayerKV:
        return LayerKV(self, name)

    def store(self, name: str, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        start, total = self.length, self.length + self._new
        if name not in self.keys:
            shape = (self.batch_size, k.shape[2], self.capacity, k.shape[3])
            self.keys[name] = k.new_zeros(shape)
            self.values[name] = v.new_zeros(shape)
        keys, values = self.keys[name], self.values[name]
        keys[:, :, start:total] = k.transpose(1, 2)
        values[:, :, start:total] = v.transpose(1, 2)
        return keys[:, :, :total], values[:, :, :total]

    def end(self) -> None:
        """Close the forward: its tokens become part of the cache."""
        self.length += self._new
        self._new = 0
        self.mask = None


def cached_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch_shape: Tuple[int, int], cache: LayerKV
) -> torch.Tensor:
    """Attention of the new tokens' rotated q, k, v (B*S, heads, D) over the cached keys/values and their own, with
    the cache's padding-aware causal mask (one sdpa call); returns (B, S, heads * D)."""
    batch, seq = batch_shape
    keys, values = cache.update(k.view(batch, seq, -1, k.shape[-1]), v.view(batch, seq, -1, v.shape[-1]))
    q = q.view(batch, seq, -1, q.shape[-1]).transpose(1, 2)  # (B, heads, S, D)
    n_rep = q.shape[1] // keys.shape[1]
    if n_rep > 1:  # grouped-query attention: each kv head serves n_rep consecutive query heads
        keys, values = keys.repeat_interleave(n_rep, dim=1), values.repeat_interleave(n_rep, dim=1)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=cache.mask)
    return out.transpose(1, 2).reshape(batch, seq, -1)


__all__ = ["KVCache", "LayerKV", "cached_attention"]
