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

from torch import nn

from internlm.model import InternLM, RMSNorm

from .layout import model_tensor_problems
from .process_groups import ParallelContext
from .tensor_parallel import (
    ColumnParallelLinear,
    TensorParallelRMSNorm,
    ReplicatedKVLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)


def _kv_projection(linear: nn.Linear, pc: ParallelContext, heads: int, kv_heads: int, head_dim: int) -> nn.Module:
    tp, sp, group = pc.tp_size, pc.sequence_parallel, pc.tp_group
    if kv_heads % tp == 0:
        return ColumnParallelLinear.from_linear(linear, group, sp, input_region=False)
    # query head i reads kv head i // (heads / kv_heads); with T % kv_heads == 0 a rank's heads / T query
    # heads all fall into one kv group, so each rank needs exactly one kv head
    first_query_head = pc.tp_rank * (heads // tp)
    kv_start = first_query_head // (heads // kv_heads)
    return ReplicatedKVLinear(linear, kv_start, 1, head_dim, group, sp, input_region=False)


def parallelize_model(model: InternLM, pc: ParallelContext) -> InternLM:
    """Shard ``model`` in place for this rank's tensor group and mark every parameter; returns it.

    A no-op when ``pc.tp_size == 1``. Raises ValueError (naming the config key) when the model cannot be
    split over ``pc.tp_size`` ranks.
    """
    if pc.tp_size == 1:
        return model
    cfg = model.config
    problems = model_tensor_problems(cfg, pc.tp_size)
    if problems:
        raise ValueError(
            f"rank {pc.rank}: cannot split the model over tensor size {pc.tp_size}: " + "; ".join(problems)
        )
    group, sp = pc.tp_group, pc.sequence_parallel
    heads, kv_heads, head_dim = cfg.num_attention_heads, cfg.num_kv_attention_heads, cfg.head_dim

    if model.embed_tokens is not None:
        model.embed_tokens = VocabParallelEmbedding.from_embedding(model.embed_tokens, group, sp)

    for layer in model.layers.values():
        attn, mlp = layer.self_attn, layer.mlp
        layer.input_layernorm = TensorParallelRMSNorm(layer.input_layernorm, group, sp, True)
        attn.q_proj = ColumnParallelLinear.from_linear(attn.q_proj, group, sp, input_region=False)
        attn.k_proj = _kv_projection(attn.k_proj, pc, heads, kv_heads, head_dim)
        attn.v_proj = _kv_projection(attn.v_proj, pc, heads, kv_heads, head_dim)
        attn.o_proj = RowParallelLinear.from_linear(attn.o_proj, group, sp)

        layer.post_attention_layernorm = TensorParallelRMSNorm(layer.post_attention_layernorm, group, sp, True)
        mlp.gate_proj = ColumnParallelLinear.from_linear(mlp.gate_proj, group, sp, input_region=False)
        mlp.up_proj = ColumnParallelLinear.from_linear(mlp.up_proj, group, sp, input_region=False)
        mlp.down_proj = RowParallelLinear.from_linear(mlp.down_proj, group, sp)

    if model.norm is not None:
        if not isinstance(model.norm, RMSNorm):
            raise TypeError(f"rank {pc.rank}: expected model.norm to be an RMSNorm, got {type(model.norm).__name__}")
        # the final norm feeds lm_head, which enters the region itself; under SP it sees S/T tokens
        model.norm = TensorParallelRMSNorm(model.norm, group, sp, enter_region=False)

    if model.lm_head is not None:
        model.lm_head = ColumnParallelLinear.from_linear(model.lm_head, group, sp, input_region=True)

    _check_marked(model, pc)
    return model


def _check_marked(model: nn.Module, pc: ParallelContext) -> None:
    """Every parameter must be either a shard or a duplicate, or the optimizer would mis-handle it."""
    for name, param in model.named_parameters():
        if getattr(param, "_tp_shard", None) is None and not getattr(param, "_tp_duplicate", False):
            raise RuntimeError(
                f"rank {pc.rank}: parameter {name!r} was left unmarked by parallelize_model; "
                f"teach internlm/parallel/parallelize.py how to split the module that owns it"
            )


__all__ = ["parallelize_model"]
