"""Parameters one device holds: per decoder layer and per pipeline stage, as `internlm.parallel.parallelize_model`
places them. Every other count in the planner (memory, communication, the start-up estimate) calls these.

Notation: ``H`` hidden, ``F`` MLP intermediate, ``KV`` = kv heads x head dim, ``V`` vocab, ``T`` tensor size,
``beta`` = 1 with q/k/v/o biases (``qkvo_bias``) else 0. One decoder layer on one tensor rank:

    q        H H / T + beta H / T                  column parallel
    k, v     KV H / T + beta KV / T  each          column parallel when the kv heads split over T, else the
             KV H + beta KV          each          full weight (`ReplicatedKVLinear`: every rank computes its kv head)
    o        H H / T + beta H                      row parallel: the bias is replicated
    mlp      3 H F / T
    norms    2 H                                   replicated

A stage holds the layers `partition_layers` gives its model chunks, plus the embedding ``V H / T`` on virtual
stage 0 and the final norm ``H`` and the head ``V H / T`` on the last virtual stage.
"""

from __future__ import annotations

from typing import Any

from internlm.parallel.pipeline.partition import partition_layers


def dtype_bytes(dtype: Any) -> int:
    """2 for 16-bit dtypes, 4 otherwise (fp32)."""
    return 2 if "16" in str(dtype) else 4


def layer_params(model_config: Any, tensor: int = 1) -> int:
    """Parameters of one decoder layer held by one tensor rank (the table of the module docstring)."""
    mc = model_config
    h, f, kv, t = mc.hidden_size, mc.intermediate_size, mc.kv_dim, tensor
    bias = 1 if mc.qkvo_bias else 0
    kv_heads = mc.num_kv_attention_heads or mc.num_attention_heads
    q = h * h // t + bias * h // t
    kv_split = kv_heads % t == 0
    k = (kv * h // t + bias * kv // t) if kv_split else (kv * h + bias * kv)  # replicated k/v: the full weight
    o = h * h // t + bias * h  # row parallel: the bias is replicated
    mlp = 3 * h * f // t
    return q + 2 * k + o + mlp + 2 * h


def stage_params(model_config: Any, layout: Any, pipeline_rank: int) -> int:
    """Parameters one tensor rank of ``pipeline_rank`` holds under ``layout`` (tensor, pipeline, num_chunks):
    its chunks' layers, the embedding on virtual stage 0, the final norm and head on the last virtual stage."""
    mc = model_config
    pp, chunks = layout.pipeline, layout.num_chunks
    embedding = mc.vocab_size * mc.hidden_size // layout.tensor
    per_layer = layer_params(mc, layout.tensor)
    params = 0
    for c, layer_range in enumerate(partition_layers(mc.num_layers, pp, chunks)[pipeline_rank]):
        virtual = c * pp + pipeline_rank
        params += len(layer_range) * per_layer
        if virtual == 0:
            params += embedding
        if virtual == pp * chunks - 1:
            params += mc.hidden_size + embedding  # final norm + lm_head
    return params


def most_loaded_stage_params(model_config: Any, layout: Any) -> int:
    """The largest `stage_params` over the pipeline ranks of ``layout``: what one device of the most loaded stage
    holds, sends in the data-parallel collectives and initialises at start-up."""
    return max(stage_params(model_config, layout, r) for r in range(layout.pipeline))


__all__ = ["dtype_bytes", "layer_params", "stage_params", "most_loaded_stage_params"]
