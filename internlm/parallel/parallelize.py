"""`parallelize_model`: turn a single-device `InternLM` (or a pipeline stage of it) into this rank's
tensor-parallel shard, in place, without touching the model code (torchtitan style).

Per decoder layer (T = tensor size, SP = sequence parallel):

    input_layernorm          -> TensorParallelRMSNorm: copy region (SP: all-gather along S), once for q, k, v
    q_proj                   -> column parallel (heads / T query heads per rank)
    k_proj, v_proj           -> column parallel if kv_heads % T == 0, else ReplicatedKVLinear (T % kv_heads == 0)
    o_proj                   -> row parallel: all-reduce (SP: reduce-scatter along S)
    post_attention_layernorm -> TensorParallelRMSNorm, once for gate and up
    gate_proj, up_proj       -> column parallel
    down_proj                -> row parallel
and around the layers:
    embed_tokens             -> vocab parallel: all-reduce (SP: reduce-scatter, so hidden states are S/T-sharded)
    norm                     -> replicated (SP: on the local chunk, partial weight gradient)
    lm_head                  -> column parallel over the vocab (SP: gathers S first); logits stay vocab-split

Works on a model on the meta device (new shards are meta; then ``to_empty`` + ``init_weights``) and on a
materialised one (each shard is sliced from the full weight). Pipeline stages may lack embed_tokens / norm /
lm_head and hold only some layers; stages without the embedding receive (SP: already sharded) hidden states.
"""

from __future__ import annotations

import torch
from torch import nn

from internlm.model import InternLM, RMSNorm

from .context.attention import ContextAttentionCore
from .layout import tensor_split_problems
from .process_groups import ParallelContext
from .tensor_parallel import (
    ColumnParallelLinear,
    ReplicatedKVLinear,
    RowParallelLinear,
    TensorParallelRMSNorm,
    VocabParallelEmbedding,
)
from .tp_shard import param_shards


@torch.no_grad()
def _adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` takes this rank's piece (`TPShard.slice`) of each parameter of the module it replaces.

    On the meta device there is nothing to copy: the values come from ``init_weights`` later.
    """
    for name, param in new.named_parameters(recurse=False):
        source = getattr(old, name)
        param.requires_grad_(source.requires_grad)
        if not param.is_meta:
            param.copy_(new.tp_shards[name].slice(source))
    return new


def _where(module: nn.Module) -> dict:
    """Device and dtype of ``module``'s parameters, for its replacement."""
    weight = module.weight
    return dict(device=weight.device, dtype=weight.dtype)


def _column(linear: nn.Linear, pc: ParallelContext, input_region: bool) -> ColumnParallelLinear:
    layer = ColumnParallelLinear(
        linear.in_features,
        linear.out_features,
        linear.bias is not None,
        pc.tp_group,
        pc.sequence_parallel,
        input_region,
        **_where(linear),
    )
    return _adopt(layer, linear)


def _row(linear: nn.Linear, pc: ParallelContext) -> RowParallelLinear:
    layer = RowParallelLinear(
        linear.in_features,
        linear.out_features,
        linear.bias is not None,
        pc.tp_group,
        pc.sequence_parallel,
        **_where(linear),
    )
    return _adopt(layer, linear)


def _norm(norm: RMSNorm, pc: ParallelContext, enter_region: bool) -> TensorParallelRMSNorm:
    layer = TensorParallelRMSNorm(
        norm.weight.shape[0], norm.eps, pc.tp_group, pc.sequence_parallel, enter_region, **_where(norm)
    )
    return _adopt(layer, norm)


def _kv_projection(linear: nn.Linear, pc: ParallelContext, heads: int, kv_heads: int, head_dim: int) -> nn.Module:
    tp = pc.tp_size
    if kv_heads % tp == 0:
        return _column(linear, pc, input_region=False)
    # query head i reads kv head i // (heads / kv_heads); with T % kv_heads == 0 a rank's heads / T query
    # heads all fall into one kv group, so each rank needs exactly one kv head
    first_query_head = pc.tp_rank * (heads // tp)
    kv_start = first_query_head // (heads // kv_heads)
    layer = ReplicatedKVLinear(
        linear.in_features,
        linear.out_features,
        linear.bias is not None,
        kv_start,
        1,
        head_dim,
        pc.tp_group,
        pc.sequence_parallel,
        input_region=False,
        **_where(linear),
    )
    return _adopt(layer, linear)


def parallelize_context(model: InternLM, pc: ParallelContext) -> InternLM:
    """Under context parallelism (``pc.cp_size > 1``) every layer's attention core becomes a
    `ContextAttentionCore` over ``pc.cp_group`` (ring or all-to-all by the layout's ``context_mode``); the rest of
    the layer works token by token on this rank's tokens and needs no change. Returns ``model``."""
    if getattr(pc, "cp_size", 1) > 1:
        for layer in model.layers.values():
            layer.self_attn.core = ContextAttentionCore(pc.cp_group)
    return model


def parallelize_model(model: InternLM, pc: ParallelContext) -> InternLM:
    """Shard ``model`` in place for this rank's tensor group and declare every parameter's `TPShard`; swap in the
    context-parallel attention core (`parallelize_context`); returns it.

    The tensor split is a no-op when ``pc.tp_size == 1``. Raises ValueError (naming the config key) when the model
    cannot be split over ``pc.tp_size`` ranks.
    """
    parallelize_context(model, pc)
    if pc.tp_size == 1:
        return model
    cfg = model.config
    problems = tensor_split_problems(cfg, pc.tp_size)
    if problems:
        raise ValueError(
            f"rank {pc.rank}: cannot split the model over tensor size {pc.tp_size}: "
            + "; ".join(str(p) for p in problems)
        )
    heads, kv_heads, head_dim = cfg.num_attention_heads, cfg.num_kv_attention_heads, cfg.head_dim

    if model.embed_tokens is not None:
        emb = model.embed_tokens
        layer = VocabParallelEmbedding(
            emb.num_embeddings, emb.embedding_dim, pc.tp_group, pc.sequence_parallel, **_where(emb)
        )
        model.embed_tokens = _adopt(layer, emb)

    for layer in model.layers.values():
        attn, mlp = layer.self_attn, layer.mlp
        layer.input_layernorm = _norm(layer.input_layernorm, pc, enter_region=True)
        attn.q_proj = _column(attn.q_proj, pc, input_region=False)
        attn.k_proj = _kv_projection(attn.k_proj, pc, heads, kv_heads, head_dim)
        attn.v_proj = _kv_projection(attn.v_proj, pc, heads, kv_heads, head_dim)
        attn.o_proj = _row(attn.o_proj, pc)

        layer.post_attention_layernorm = _norm(layer.post_attention_layernorm, pc, enter_region=True)
        mlp.gate_proj = _column(mlp.gate_proj, pc, input_region=False)
        mlp.up_proj = _column(mlp.up_proj, pc, input_region=False)
        mlp.down_proj = _row(mlp.down_proj, pc)

    if model.norm is not None:
        if not isinstance(model.norm, RMSNorm):
            raise TypeError(f"rank {pc.rank}: expected model.norm to be an RMSNorm, got {type(model.norm).__name__}")
        # the final norm feeds lm_head, which enters the region itself; under SP it sees S/T tokens
        model.norm = _norm(model.norm, pc, enter_region=False)

    if model.lm_head is not None:
        model.lm_head = _column(model.lm_head, pc, input_region=True)

    _check_declared(model, pc)
    return model


def _check_declared(model: nn.Module, pc: ParallelContext) -> None:
    """Every parameter must have a record for this tensor group, or the optimizer would mis-handle it."""
    for name, shard in param_shards(model).items():
        if shard.size != pc.tp_size:
            raise RuntimeError(
                f"rank {pc.rank}: parameter {name!r} has no tensor-parallel record after parallelize_model; "
                f"teach internlm/parallel/parallelize.py how to split the module that owns it"
            )


__all__ = ["parallelize_context", "parallelize_model"]
