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

The non-matmul work runs through the fused kernels of `internlm.kernels` (RMSNorm, rotary embedding with cos/sin
computed once per forward and shared by every layer, SwiGLU): Triton on GPUs, their eager (pure torch) reference
elsewhere, with the same values as the formulas written here (`apply_rotary`, ``F.silu(gate) * up``). With
``fuse_head_loss`` the chunk holding ``lm_head`` returns a `HeadInput` instead of logits, for a loss that applies
the head chunk by chunk (`internlm.kernels.chunked_linear_cross_entropy`): the full logits never exist.

Two paths run through the layers, each a method of its own:

* ``forward`` (``model(ids, cu_seqlens=..., labels=...)``): packed training and scoring. It is what the pipeline
  steps call and what the trainer's wrappers wrap: activation checkpointing and ``torch.compile``
  (`internlm.train.activation_checkpoint`) replace ``forward`` on layer *instances*, nothing else.
* ``decode`` (``model.decode(ids, cache, attention_mask)``): the generation step over a `KVCache`, padded rows.
  Every level has its own ``decode`` (`InternLM`, `DecoderLayer`, `Attention`), which no wrapper replaces, so a
  trainer's wrapped chunk generates with the plain eager layers without reaching around its wrappers (the norms
  and the MLP are shared by both paths; a recomputed MLP under ``model.checkpoint="mlp"`` is exact without grad).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from internlm.kernels import apply_rotary as rotate
from internlm.kernels import chunked_linear_cross_entropy, rms_norm, rotary_cos_sin, swiglu
from internlm.labels import IGNORE_INDEX

from .attention import PackedDocs, packed_causal_attention, positions_from_cu_seqlens
from .config import InternLMConfig
from .init import init_weights
from .kv_cache import KVCache, LayerKV, cached_attention

Rope = Tuple[torch.Tensor, torch.Tensor]
"""``(cos, sin)`` of `internlm.kernels.rotary_cos_sin`, each (tokens, head_dim / 2) fp32: one per forward."""


def dynamic_rope(config: InternLMConfig) -> bool:
    """Whether the rotary base depends on the forward's length (dynamic NTK scaling)."""
    return config.rope_scaling is not None and config.rope_scaling["type"] == "dynamic"


def rope_for(config: InternLMConfig, position_ids: torch.Tensor, seq_len: Optional[int] = None) -> Rope:
    """``(cos, sin)`` of ``position_ids`` for ``config``'s rotary base and scaling; ``seq_len`` (the forward's
    max position + 1, a host int) is read by dynamic scaling only."""
    return rotary_cos_sin(
        position_ids,
        config.head_dim,
        config.rope_base,
        scaling=config.rope_scaling,
        max_position_embeddings=config.max_position_embeddings,
        seq_len=seq_len,
    )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 for stability, return the input dtype:
        # F.rms_norm(x.float(), (H,), eps).to(x.dtype) * weight, fused (saves x and one fp32 rstd per token)
        return rms_norm(x, self.weight, self.eps)


def apply_rotary(x: torch.Tensor, position_ids: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary position embedding, rotate-half convention (as Hugging Face InternLM / LLaMA): the readable
    reference of what the model computes with `internlm.kernels.rotary_cos_sin` + `internlm.kernels.apply_rotary`.

    x: (tokens, heads, head_dim); position_ids: (tokens,).
    """
    dim = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))
    freqs = position_ids.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (tokens, 1, head_dim)
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * emb.cos() + rotated * emb.sin()).to(x.dtype)


class AttentionCore(nn.Module):
    """Causal attention of packed documents on (tokens, heads, head_dim) q, k, v (`packed_causal_attention`).

    No parameters: a module of its own so that activation checkpointing can recompute it alone
    (``model.checkpoint="attn"``) and ``torch.compile`` can leave it out of a compiled layer (its shapes follow
    the document boundaries of each micro-batch).
    """

    def forward(self, q, k, v, docs, backend: str, max_seqlen: Optional[int] = None) -> torch.Tensor:
        return packed_causal_attention(q, k, v, docs, backend, max_seqlen)


class Attention(nn.Module):
    def __init__(self, config: InternLMConfig) -> None:
        super().__init__()
        h, kv, dt, bias = config.hidden_size, config.kv_dim, config.dtype, config.qkvo_bias
        self.config = config  # rotary base and scaling
        self.head_dim = config.head_dim
        self.backend = config.attn_backend
        self.q_proj = nn.Linear(h, h, bias=bias, dtype=dt)
        self.k_proj = nn.Linear(h, kv, bias=bias, dtype=dt)
        self.v_proj = nn.Linear(h, kv, bias=bias, dtype=dt)
        self.o_proj = nn.Linear(h, h, bias=bias, dtype=dt)
        self.core = AttentionCore()

    def _rotated_qkv(self, x: torch.Tensor, rope: Union[Rope, torch.Tensor]):
        """q, k, v as (tokens, heads, head_dim), q and k rotated, and the (B, S) of ``x``'s tokens."""
        if isinstance(rope, torch.Tensor):
            rope = rope_for(self.config, rope, int(rope.max()) + 1 if dynamic_rope(self.config) else None)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        batch_shape = q.shape[:-1]  # (B, S): under sequence parallelism the projections gathered the sequence
        q, k, v = (t.reshape(-1, t.shape[-1] // self.head_dim, self.head_dim) for t in (q, k, v))
        return rotate(q, *rope), rotate(k, *rope), v, batch_shape

    def forward(self, x, docs, rope: Union[Rope, torch.Tensor], max_seqlen: Optional[int] = None) -> torch.Tensor:
        """x: (B, S, H); docs: the batch's `PackedDocs` (or a cu_seqlens tensor); rope: this forward's (cos, sin),
        or the position ids (a layer called on its own computes cos/sin itself)."""
        q, k, v, batch_shape = self._rotated_qkv(x, rope)
        out = self.core(q, k, v, docs, self.backend, max_seqlen)
        return self.o_proj(out.reshape(*batch_shape, -1))

    def decode(self, x: torch.Tensor, rope: Rope, cache: LayerKV) -> torch.Tensor:
        """The generation step: x (B, S, H) of new tokens attend to this layer's cached keys/values (`LayerKV`)
        and their own, which join the cache."""
        q, k, v, batch_shape = self._rotated_qkv(x, rope)
        return self.o_proj(cached_attention(q, k, v, batch_shape, cache))


class SwiGLU(nn.Module):
    def __init__(self, config: InternLMConfig) -> None:
        super().__init__()
        h, f, dt = config.hidden_size, config.intermediate_size, config.dtype
        self.gate_proj = nn.Linear(h, f, bias=False, dtype=dt)
        self.up_proj = nn.Linear(h, f, bias=False, dtype=dt)
        self.down_proj = nn.Linear(f, h, bias=False, dtype=dt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # down(silu(gate(x)) * up(x)); the fused kernel saves gate and up only and recomputes silu
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    """x + Attention(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)). ``forward`` is the training path (the one the
    trainer's checkpoint / compile wrappers replace per instance), ``decode`` the generation step (never wrapped)."""

    def __init__(self, config: InternLMConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps, config.dtype)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps, config.dtype)
        self.mlp = SwiGLU(config)

    def forward(self, x, docs, rope: Union[Rope, torch.Tensor], max_seqlen: Optional[int] = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), docs, rope, max_seqlen)
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode(self, x: torch.Tensor, rope: Rope, cache: LayerKV) -> torch.Tensor:
        x = x + self.self_attn.decode(self.input_layernorm(x), rope, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class HeadInput:
    """What a model chunk holding ``lm_head`` returns when its ``fuse_head_loss`` is set: the final (normed)
    hidden states and the head module, for a loss that applies the head itself, chunk by chunk
    (`internlm.parallel.make_loss_fn`). ``logits()`` applies the head (all logits at once)."""

    hidden: torch.Tensor
    head: nn.Module

    def logits(self) -> torch.Tensor:
        return self.head(self.hidden)


class InternLM(nn.Module):
    """InternLM decoder. ``model(input_ids)`` -> logits of shape (batch, seq, vocab).

    Packed input: ``input_ids`` of shape (1, total_tokens) with ``cu_seqlens`` giving document
    boundaries; tokens never attend across documents and positions restart for every document.

    ``model(input_ids, labels=labels)`` -> the mean next-token cross-entropy (a scalar), as transformers' causal LMs
    compute it: ``labels`` has the shape of ``input_ids`` and is shifted inside (token t predicts labels[t + 1]),
    tokens labelled IGNORE_INDEX (-100) are left out:
    loss = sum_t CE(logits[t], labels[t + 1]) / #(labels[1:] != -100).

    Generation and padded batches: ``model.decode(input_ids, cache, attention_mask)`` (a `KVCache`, whose keys/values
    the new tokens join): see `internlm.model.kv_cache` and `internlm.model.generate`.

    ``fuse_head_loss`` (default False; the trainer sets it on the chunk holding the head unless
    ``model.fused_loss=False``): ``forward`` returns a `HeadInput` instead of the logits.
    """

    fuse_head_loss: bool = False

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
        cu_seqlens: Optional[Union[torch.Tensor, PackedDocs]] = None,
        position_ids: Optional[torch.Tensor] = None,
        max_seqlen: Optional[int] = None,
        cu_seqlens_list: Optional[Sequence[int]] = None,
        labels: Optional[torch.Tensor] = None,
    ) -> Union[torch.Tensor, HeadInput]:
        """input_ids: (B, S) token ids, or (B, S, hidden) hidden states on a pipeline stage without embedding.

        cu_seqlens: int32 document boundaries over the flattened B*S tokens (packed input has B == 1), or a
        `PackedDocs` holding them with their host-side values; position_ids: per-token positions, (B, S) or
        (B*S,); derived from cu_seqlens when omitted. ``cu_seqlens_list`` (the boundaries as a Python list) and
        ``max_seqlen`` spare the host syncs that reading them back from the device costs; with a bare tensor and
        neither, the sdpa backend reads the boundaries back once per forward (not once per layer).

        With dynamic rope scaling the forward's sequence length L (max position + 1) is ``max_seqlen`` when given
        (positions restart per document, as the loader's do), else the longest document of ``cu_seqlens`` (host-side
        with ``cu_seqlens_list``), else max(position_ids) + 1 (one device sync); unused without dynamic scaling.
        """
        batch, seq = input_ids.shape[0], input_ids.shape[1]
        given_max_seqlen = max_seqlen
        if cu_seqlens is None:
            if self.embed_tokens is None:
                # hidden states may be sequence-sharded (sequence parallelism): the length is not S here
                raise ValueError("a model chunk without embedding needs cu_seqlens for its hidden-state input")
            cu_seqlens = torch.arange(0, (batch + 1) * seq, seq, device=input_ids.device, dtype=torch.int32)
            cu_seqlens_list = list(range(0, (batch + 1) * seq, seq))
            max_seqlen = seq
        # a tensor becomes PackedDocs; any other docs object (PackedDocs, a context-parallel shard) goes to the cores
        docs = PackedDocs(cu_seqlens, cu_seqlens_list, max_seqlen) if torch.is_tensor(cu_seqlens) else cu_seqlens
        rope_len = None
        if dynamic_rope(self.config):
            if given_max_seqlen is not None or position_ids is None:
                rope_len = given_max_seqlen if given_max_seqlen is not None else docs.max_seqlen
            else:
                rope_len = int(position_ids.max()) + 1
        if position_ids is None:
            position_ids = positions_from_cu_seqlens(docs.cu_seqlens, docs.total)
        # rotary angles once per forward, shared by every layer (and by the recomputation of checkpointed layers)
        rope = rope_for(self.config, position_ids, rope_len)

        h = self.embed_tokens(input_ids) if self.embed_tokens is not None else input_ids
        for layer in self.layers.values():
            h = layer(h, docs, rope, max_seqlen)
        if self.norm is not None:
            h = self.norm(h)
        if labels is not None:
            return self.causal_lm_loss(h, labels)
        if self.lm_head is None:
            return h
        return HeadInput(h, self.lm_head) if self.fuse_head_loss else self.lm_head(h)

    def causal_lm_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the next token from the final (normed) hidden states (B, S, H) and ``labels``
        (B, S), shifted here: sum_t CE(lm_head(hidden[:, t]), labels[:, t + 1]) / #(labels[:, 1:] != -100), in
        fp32, the head applied chunk by chunk (`chunked_linear_cross_entropy`: the logits never exist at once)."""
        if self.lm_head is None or self.norm is None:
            raise ValueError("labels= needs the model chunk holding norm and lm_head (the last pipeline stage)")
        if tuple(labels.shape) != tuple(hidden.shape[:-1]):
            raise ValueError(
                f"labels must have the shape of input_ids {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}"
            )
        targets = labels[:, 1:].reshape(-1).to(device=hidden.device, dtype=torch.long)
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        loss_sum = chunked_linear_cross_entropy(hidden, self.lm_head.weight, targets, ignore_index=IGNORE_INDEX)
        return loss_sum / (targets != IGNORE_INDEX).sum()

    def decode(
        self,
        input_ids: torch.Tensor,
        cache: Optional[KVCache] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, S, V) of a (B, S) batch of new tokens appended to ``cache`` (a one-call cache when None);
        ``last_only``: of each row's last token only, (B, 1, V) (the head skips the others).

        ``attention_mask`` (B, S): 1 real token, 0 padding (rows are left-padded); default positions count each
        row's real tokens (`KVCache.begin`). Runs every layer's ``decode``, which no trainer wrapper replaces.
        """
        if self.embed_tokens is None or self.lm_head is None or input_ids.dim() != 2:
            raise ValueError("decode needs token ids (batch, seq) and a whole model (embed_tokens ... lm_head)")
        batch, seq = input_ids.shape
        if cache is None:
            cache = KVCache(batch, seq)
        elif cache.batch_size != batch:
            raise ValueError(f"the cache holds {cache.batch_size} rows, the input {batch}")
        positions = cache.begin(seq, attention_mask, input_ids.device)
        if position_ids is None:
            position_ids = positions
        rope = rope_for(self.config, position_ids, int(position_ids.max()) + 1 if dynamic_rope(self.config) else None)
        h = self.embed_tokens(input_ids)
        try:
            for name, layer in self.layers.items():
                h = layer.decode(h, rope, cache.layer(name))
        finally:
            cache.end()
        h = self.norm(h)
        return self.lm_head(h[:, -1:] if last_only else h)

    @classmethod
    def from_pretrained(
        cls, path: str, dtype: Any = None, device: Any = None, step: Optional[int] = None
    ) -> "InternLM":
        """The model of a training checkpoint (work_dir, checkpoints folder or step folder; newest verified step
        unless ``step``) or a Hugging Face folder, built on the meta device (no random init), then loaded tensor by
        tensor; ``dtype`` / ``device`` of the parameters (default: the saved dtype, CPU). See
        `internlm.model.pretrained`."""
        from .pretrained import from_pretrained

        return from_pretrained(cls, path, dtype=dtype, device=device, step=step)

    def init_weights(self, seed: int = 0, shards: Optional[Mapping[str, Any]] = None) -> int:
        """InternLM's initial weights, the same values in every parallel layout (`internlm.model.init`: normal
        tiles seeded by (seed, name, tile)); ``shards``: this rank's tensor-parallel pieces. Returns the number of
        random values drawn."""
        return init_weights(self, self.config.init_std, self.config.num_layers, seed, shards)
