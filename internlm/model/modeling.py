"""The InternLM decoder, readable top to bottom.

    tokens -> embed_tokens -> N x [x + Attention(RMSNorm(x)); x + SwiGLU(RMSNorm(x))] -> RMSNorm -> lm_head

Module names follow the Hugging Face InternLM layout (``embed_tokens``, ``layers.{i}.self_attn.q_proj``,
``mlp.gate_proj``, ``lm_head``...) so checkpoints convert by renaming only. The model holds no parallel
code: tensor parallelism swaps its linear layers (`internlm.parallel`), pipeline parallelism deletes the
layers a stage does not own. For that reason:

* ``layers`` is a ModuleDict keyed by the global layer index, so a stage keeps the full model's names;
* ``embed_tokens``, ``norm`` and ``lm_head`` may be ``None``: a stage without the embedding takes hidden
  states instead of token ids, a stage without the head returns hidden states;
* attention infers its head counts from the projection outputs, so sharded projections just work.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attention import packed_causal_attention, positions_from_cu_seqlens
from .config import InternLMConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 for stability, return the input dtype
        out = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return out.to(x.dtype) * self.weight


def apply_rotary(x: torch.Tensor, position_ids: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary position embedding, rotate-half convention (as Hugging Face InternLM / LLaMA).

    x: (tokens, heads, head_dim); position_ids: (tokens,).
    """
    dim = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))
    freqs = position_ids.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (tokens, 1, head_dim)
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * emb.cos() + rotated * emb.sin()).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: InternLMConfig) -> None:
        super().__init__()
        h, kv, dt, bias = config.hidden_size, config.kv_dim, config.dtype, config.qkvo_bias
        self.head_dim = config.head_dim
        self.rope_base = config.rope_base
        self.backend = config.attn_backend
        self.q_proj = nn.Linear(h, h, bias=bias, dtype=dt)
        self.k_proj = nn.Linear(h, kv, bias=bias, dtype=dt)
        self.v_proj = nn.Linear(h, kv, bias=bias, dtype=dt)
        self.o_proj = nn.Linear(h, h, bias=bias, dtype=dt)

    def forward(self, x, cu_seqlens, position_ids, max_seqlen=None):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        batch_shape = q.shape[:-1]  # (B, S): under sequence parallelism the projections gathered the sequence
        q, k, v = (t.reshape(-1, t.shape[-1] // self.head_dim, self.head_dim) for t in (q, k, v))
        q = apply_rotary(q, position_ids, self.rope_base)
        k = apply_rotary(k, position_ids, self.rope_base)
        out = packed_causal_attention(q, k, v, cu_seqlens, self.backend, max_seqlen)
        return self.o_proj(out.reshape(*batch_shape, -1))


class SwiGLU(nn.Module):
    def __init__(self, config: InternLMConfig) -> None:
        super().__init__()
        h, f, dt = config.hidden_size, config.intermediate_size, config.dtype
        self.gate_proj = nn.Linear(h, f, bias=False, dtype=dt)
        self.up_proj = nn.Linear(h, f, bias=False, dtype=dt)
        self.down_proj = nn.Linear(f, h, bias=False, dtype=dt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: InternLMConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps, config.dtype)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps, config.dtype)
        self.mlp = SwiGLU(config)

    def forward(self, x, cu_seqlens, position_ids, max_seqlen=None):
        x = x + self.self_attn(self.input_layernorm(x), cu_seqlens, position_ids, max_seqlen)
        return x + self.mlp(self.post_attention_layernorm(x))


class InternLM(nn.Module):
    """InternLM decoder. ``model(input_ids)`` -> logits of shape (batch, seq, vocab).

    Packed input: ``input_ids`` of shape (1, total_tokens) with ``cu_seqlens`` giving document
    boundaries; tokens never attend across documents and positions restart for every document.
    """

    def __init__(self, config: InternLMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens: Optional[nn.Embedding] = nn.Embedding(
            config.vocab_size, config.hidden_size, dtype=config.dtype
        )
        self.layers = nn.ModuleDict({str(i): DecoderLayer(config) for i in range(config.num_layers)})
        self.norm: Optional[RMSNorm] = RMSNorm(config.hidden_size, config.norm_eps, config.dtype)
        self.lm_head: Optional[nn.Linear] = nn.Linear(
            config.hidden_size, config.vocab_size, bias=False, dtype=config.dtype
        )
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        cu_seqlens: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        max_seqlen: Optional[int] = None,
    ) -> torch.Tensor:
        """input_ids: (B, S) token ids, or (B, S, hidden) hidden states on a pipeline stage without embedding.

        cu_seqlens: int32 document boundaries over the flattened B*S tokens (packed input has B == 1);
        position_ids: per-token positions, (B, S) or (B*S,); derived from cu_seqlens when omitted.
        """
        batch, seq = input_ids.shape[0], input_ids.shape[1]
        device = input_ids.device
        if cu_seqlens is None:
            if self.embed_tokens is None:
                # hidden states may be sequence-sharded (sequence parallelism): the length is not S here
                raise ValueError("a model chunk without embedding needs cu_seqlens for its hidden-state input")
            cu_seqlens = torch.arange(0, (batch + 1) * seq, seq, device=device, dtype=torch.int32)
            max_seqlen = seq
        total = int(cu_seqlens[-1])
        if position_ids is None:
            position_ids = positions_from_cu_seqlens(cu_seqlens, total)
        position_ids = position_ids.reshape(-1)

        h = self.embed_tokens(input_ids) if self.embed_tokens is not None else input_ids
        for layer in self.layers.values():
            h = layer(h, cu_seqlens, position_ids, max_seqlen)
        if self.norm is not None:
            h = self.norm(h)
        if self.lm_head is not None:
            h = self.lm_head(h)
        return h

    @torch.no_grad()
    def init_weights(self, seed: int = 0, shards: Optional[Mapping[str, Any]] = None) -> None:
        """InternLM initialisation: normal(0, init_std) for weights, init_std / sqrt(2 * num_layers) for
        the output projections (o_proj, down_proj), ones for norms, zeros for biases.

        Each parameter draws from a generator seeded by (seed, parameter name) over its *full* shape, so
        the values do not depend on which parameters a process holds. ``shards`` maps a parameter name to its
        placement when the model is a tensor-parallel shard (`internlm.parallel.param_shards`; any object with
        ``global_shape`` and ``slice(full)``): the parameter takes its slice of the same full tensor, and every
        layout starts from exactly the single-device weights.
        """
        shards = shards or {}
        std = self.config.init_std
        out_std = std / math.sqrt(2.0 * self.config.num_layers)
        for name, param in self.named_parameters():
            shard = shards.get(name)
            full_shape = list(shard.global_shape) if shard is not None else list(param.shape)
            if name.endswith("norm.weight"):
                full = torch.ones(full_shape)
            elif name.endswith(".bias"):
                full = torch.zeros(full_shape)
            else:
                gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
                scale = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                full = torch.empty(full_shape).normal_(0.0, scale, generator=gen)
            if shard is not None:
                full = shard.slice(full)
            param.copy_(full.to(param.dtype))
