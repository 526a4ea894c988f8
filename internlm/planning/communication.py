"""Communication and checkpoint costs of one optimizer step for a model, a `Layout` and a batch shape.

Bytes are what one device *sends* per optimizer step with ring collectives (an all-reduce of n bytes over g
ranks sends 2 (g-1)/g n, an all-gather or reduce-scatter of n bytes in total (g-1)/g n), for the most loaded
pipeline stage. With N = micro_bsz * seq_len / C * hidden activation elements of b bytes (C = context size: a
context rank holds 1/C of the tokens), T = tensor size:

    tensor    per layer and micro-batch 8 (T-1)/T N b (2 collectives forward, 2 backward, with or without
              sequence parallelism); with full recomputation 10 (T-1)/T N b, 11 under sequence parallelism: the
              forward runs again, but torch's non-reentrant checkpoint stops the recomputation at the last saved
              tensor, so the layer's final collective (MLP all-reduce or reduce-scatter) is not repeated (measured
              by `internlm.simulation`); a fraction f of the layers recomputed: 8 + f (10 or 11 - 8); 8 with the
              MLP recomputed (``"mlp"``: for the same reason its closing collective is not repeated, and its
              gather sits in the norm, outside) or attention's core (``"attn"``: no collective inside); per layer
              of the most loaded stage (ceil(L / P_pp) layers) or of ``pipeline_rank``'s chunks; plus the
              embedding and the head input, 2 (T-1)/T N b each, on the stages that hold them (both with one stage)
    pipeline  per micro-batch and model chunk one activation forward and one gradient backward, N b each
              (N b / T under sequence parallelism, which keeps hidden states S/T-sharded between stages); for one
              ``pipeline_rank``, the messages that rank sends: 1F1B's first stage sends no gradient and its last
              no activation (one message per micro-batch), the interleaved schedule's first (last) rank sends no
              gradient of chunk 0 (no activation of the last chunk): 2 V - 1 per micro-batch
    data      P parameters per device (`most_loaded_stage_params`, or `stage_params` of ``pipeline_rank``),
              z = zero1, r = data / zero1 * C replicas (context ranks hold replicated weights): fp32
              gradient reduce-scatter in the zero1 group (z-1)/z 4 P, all-reduce of the owned shard across
              replicas 2 (r-1)/r 4 P/z, and the all-gather of the updated parameters (z-1)/z b P

    context   per layer and micro-batch, with n = micro_bsz * seq_len / C tokens per rank, A query and K kv heads per
              tensor rank, D head dim (`context_layer_bytes`: the kernels' `context_attention_bytes`):
              ring: forward (C-1) sends of this rank's K and V blocks, n K D b each; backward (C-1) sends of K
                    and V and C sends of dK and dV in fp32 (the accumulator travels back to the block's owner):
                    4 (C-1) n K D b + 8 C n K D per layer
              a2a:  all-to-alls of q, k, v and the output forward and their inverses backward, each sending
                    (C-1)/C of the tensor: 2 (C-1)/C n D b (2 A + 2 L) per layer, L = lcm(K, C) kv heads after
                    the replication that C > K needs
              a recomputed layer sends its forward bytes again; a recomputed core (``"attn"``) the ring's forward,
              or a2a's q, k, v all-to-all only (non-reentrant checkpoint stops at the last saved tensor)

Tensor groups are neighbours (inside a node: NVLink), context groups next to them; data-parallel and pipeline
neighbours stride by tensor x context and so, with tensor x context = GPUs per node, sit on other nodes (the network).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

from internlm.parallel.context.traffic import AttentionTraffic, context_attention_bytes
from internlm.parallel.pipeline.partition import partition_layers

from .activations import local_heads
from .params import dtype_bytes, most_loaded_stage_params, stage_params
from .recompute import Checkpoint, checkpointed_layer_count


@dataclass(frozen=True)
class StepCommunication:
    """Bytes one device sends per optimizer step, by parallel dimension."""

    tensor: float
    pipeline: float
    data_gradients: float
    data_params: float
    context: float = 0.0

    @property
    def data(self) -> float:
        return self.data_gradients + self.data_params

    def by_link(self) -> Dict[str, float]:
        """Bytes per link type when the tensor group fills a node (intra-node) and the rest crosses nodes."""
        return {
            "intra-node (tensor + context)": self.tensor + self.context,
            "inter-node (pipeline + data)": self.pipeline + self.data,
        }


def context_layer_bytes(model_config: Any, layout: Any, tokens: int) -> AttentionTraffic:
    """Bytes one context rank sends for one decoder layer's attention and one micro-batch of ``tokens`` (global)
    tokens: forward, backward and the recomputation of the core alone (`context_attention_bytes`, the kernels' own
    count, module docstring); all 0 without context parallelism."""
    c = getattr(layout, "context", 1)
    heads, kv = local_heads(model_config, layout.tensor)
    b, d = dtype_bytes(model_config.dtype), model_config.head_dim
    return context_attention_bytes(getattr(layout, "context_mode", "ring"), tokens // c, c, heads, kv, d, b)


def step_communication(
    model_config: Any,
    layout: Any,
    micro_bsz: int,
    seq_len: int,
    micro_num: int,
    checkpoint: Checkpoint = False,
    pipeline_rank: Optional[int] = None,
) -> StepCommunication:
    """Bytes sent per device per step; see the module docstring for the formulas. ``checkpoint`` is
    ``model.checkpoint`` (the recomputed forwards repeat their collectives). ``pipeline_rank``: the pipeline
    messages of that rank (default: a middle rank, the most a rank sends)."""
    mc = model_config
    b = dtype_bytes(mc.dtype)
    t, pp, z, c = layout.tensor, layout.pipeline, layout.zero1, getattr(layout, "context", 1)
    replicas = layout.data // z * c
    n_bytes = micro_bsz * seq_len // c * mc.hidden_size * b
    ring = (t - 1) / t
    layers = math.ceil(mc.num_layers / pp)
    if pipeline_rank is not None:  # that rank's chunks' layers (`partition_layers`)
        layers = sum(len(r) for r in partition_layers(mc.num_layers, pp, layout.num_chunks)[pipeline_rank])

    if pipeline_rank is None:  # the most loaded stage: the embedding or the head, both with one stage
        ends = 2 if pp == 1 else 1
    else:
        ends = int(pipeline_rank == 0) + int(pipeline_rank == pp - 1)

    def tensor_bytes(collectives: float) -> float:  # ``collectives`` x (T-1)/T N b per layer, + embedding, head
        return micro_num * (layers * collectives * ring * n_bytes + 2 * ends * ring * n_bytes)

    recomputed = 11 if layout.sequence_parallel else 10
    fraction = checkpointed_layer_count(checkpoint, mc.num_layers) / mc.num_layers
    tensor = tensor_bytes(recomputed if fraction >= 1.0 else 8)
    if 0 < fraction < 1:
        tensor += fraction * (tensor_bytes(recomputed) - tensor)
    message = n_bytes / t if layout.sequence_parallel else n_bytes
    messages = 2 * layout.num_chunks
    if pipeline_rank in (0, pp - 1):  # an end of the pipeline: one direction of one chunk is not sent
        messages -= 1
    pipeline = messages * micro_num * message if pp > 1 else 0.0
    params = most_loaded_stage_params(mc, layout) if pipeline_rank is None else stage_params(mc, layout, pipeline_rank)
    gradients = (z - 1) / z * 4 * params + 2 * (replicas - 1) / replicas * 4 * params / z
    gather = (z - 1) / z * b * params
    # a recomputed layer repeats its attention's forward bytes, a recomputed core (``"attn"``) what the core resends
    attn = context_layer_bytes(mc, layout, micro_bsz * seq_len)
    again = checkpointed_layer_count(checkpoint, layers) * attn.forward
    again += layers * attn.recompute if checkpoint == "attn" else 0.0
    context = micro_num * (layers * (attn.forward + attn.backward) + again)
    return StepCommunication(
        tensor=tensor, pipeline=pipeline, data_gradients=gradients, data_params=gather, context=context
    )


def checkpoint_bytes(model_config: Any) -> Dict[str, float]:
    """Bytes of one checkpoint: model weights in the model dtype, optimizer fp32 master + two Adam moments.

    Each piece is written once (zero1 replicas and data-parallel copies of the weights do not write).
    """
    params = model_config.num_params()
    out = {"model": params * dtype_bytes(model_config.dtype), "optimizer": 12.0 * params}
    out["total"] = out["model"] + out["optimizer"]
    return out


__all__ = ["StepCommunication", "context_layer_bytes", "step_communication", "checkpoint_bytes"]
