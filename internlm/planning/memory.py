"""Peak memory per device of a training run: model states plus the activations of
`internlm.planning.activations` held over the pipeline schedule's order of forwards and backwards.

Checked in ``tests/planning/test_memory_model.py`` against the peak of live tensor storages over real CPU
training steps.
Notation as in `internlm.planning.activations`; ``P`` parameters held by the device (`internlm.planning.params`:
its pipeline stage's layers, plus the embedding on the first and the final norm and head on the last stage,
tensor-sharded as `internlm.parallel.parallelize_model` places them); ``Z`` zero1 size.

**Model states** (`HybridZeroOptimizer`, `FlatBuffer`):

    weights     b * P           parameters are views into one flat buffer per kind, in the model dtype
    gradients   4 * P           fp32 accumulation buffer (every micro-batch's gradient is added into it in fp32)
              + 4 * P / Z       the reduced slice this rank owns (a separate tensor only when Z > 1)
    optimizer   12 * P / Z      fp32 master slice + AdamW exp_avg + exp_avg_sq (allocated at the first update)

**Micro-batches in flight.** Without a pipeline one micro-batch at a time. 1F1B: stage r runs
``w = min(P_pp - r - 1, m)`` warm-up forwards, so holds up to ``min(P_pp - r, m)`` micro-batches (the first stage
``min(P_pp, m)``). Interleaved with V chunks: ``w = min(m V, 2 (P_pp - r - 1) + (V - 1) P_pp)`` warm-up virtual
steps, each holding one chunk's activations (Megatron's count: about ``L / P_pp * P_pp * (1 + (P_pp - 1) /
(P_pp V))`` layers on the first stage). The estimate replays the schedule's order of forwards and backwards on
every pipeline rank and takes the peak of ``held + transient``, where a stage that is not the first also keeps
each in-flight micro-batch's received input (``b N H / s``, unless its first layer saves that very storage:
fp32 models and recomputed layers) and a stage that is not the last keeps each output it sent (``b N H / s``).
Stage-to-stage tensors that outlive their micro-batch are held too: 1F1B's loop keeps the previous micro-batch's
input and output gradients (``b N H / s`` each), and the interleaved schedule keeps every exchange of the step
(received activations, their input gradients, received output gradients) until the step ends.

**Context parallelism** (``parallel.context = C``): a context rank holds ``N / C`` tokens of every micro-batch
from embedding to loss, so every activation term above is taken with ``N / C`` tokens; the model states do not
change (weights are replicated across context ranks, optimizer slices over zero1 as before). Ring attention computes
its blocks as explicit fp32 matmuls on CUDA (the fused CPU kernel holds no score matrix): a layer's backward holds
up to four (A, c, c) score-sized tensors, c = N / 2C (`ring_block_transient`), with the layer output's gradient:
the layer's backward working set is the larger of that and the usual one. Its in-flight K/V blocks (two
(N / C, K, D) blocks) are left out, like other kernels' scratch.

**Peak per device** = weights + gradients + optimizer + max over the schedule of (activations held + transient of
the running step: the loss forward or backward, or one layer's backward working set and recomputation). The most
loaded pipeline rank is reported. Not counted: the CUDA context, NCCL and cuBLAS workspaces, allocator
fragmentation and kernels' internal scratch; leave headroom for them (``tools/plan.py`` counts a device as
fitting below 92% of its memory).

Every function takes ``fused_loss`` (default True, as ``model.fused_loss``); ``checkpoint`` is ``model.checkpoint``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from internlm.parallel.pipeline.partition import partition_layers
from internlm.parallel.pipeline.schedules import schedule_order

from .activations import (
    backward_working_set,
    embedding_saved_bytes,
    head_memory,
    layer_activation_bytes,
    layer_input_bytes,
    ring_block_transient,
    rotary_bytes,
)
from .params import dtype_bytes, stage_params
from .recompute import Checkpoint, checkpointed_layer_count, selective_mode

STATE_KEYS = ("weights", "gradients", "optimizer")


@dataclass
class ChunkMemory:
    """One model chunk of one pipeline rank: its layers and per-micro-batch activation bytes."""

    virtual_stage: int
    layers: int
    recomputed: int
    first: bool  # holds the embedding (virtual stage 0)
    last: bool  # holds the head and the loss
    saved: float  # kept per micro-batch in flight (layers, kept stage input/output, embedding ids, head)
    head_saved: float  # the part of ``saved`` that the head's backward frees before the layers' backward
    forward_extra: float  # transient during its forward (the loss on the last virtual stage)
    head_backward_extra: float  # transient during the loss backward (last virtual stage)
    layer_backward_extra: float  # transient during a layer's backward (its working set, its recomputation)


@dataclass
class StageMemory:
    """Peak memory of one pipeline rank (bytes), with how it was reached."""

    pipeline_rank: int
    params: int
    weights: float
    gradients: float
    optimizer: float
    activations: float  # saved activations in flight at the peak, and stage-to-stage tensors still referenced
    transient: float  # the running step's transient at the peak (loss, layer backward, recomputation)
    in_flight: int  # micro-batch chunks whose activations are held at the peak
    chunks: List[ChunkMemory] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.transient

    def as_dict(self) -> Dict[str, float]:
        out = {key: float(getattr(self, key)) for key in (*STATE_KEYS, "activations", "transient")}
        out["total"] = float(self.total)
        return out


def _layout_sizes(layout: Any) -> Tuple[int, int, int, int, bool]:
    tp, pp = layout.tensor, layout.pipeline
    zero1 = layout.zero1 if layout.zero1 > 0 else layout.data
    return tp, pp, zero1, layout.num_chunks, bool(layout.sequence_parallel and tp > 1)


def stage_memory(
    model_config: Any,
    layout: Any,
    micro_bsz: int,
    seq_len: int,
    micro_num: int,
    checkpoint: Checkpoint = False,
    pipeline_rank: int = 0,
    attn_backend: Optional[str] = None,
    fused_loss: bool = True,
    attn_device: str = "cuda",
) -> StageMemory:
    """Peak memory of one device on ``pipeline_rank`` (tensor rank 0; every tensor rank holds the same bytes).
    ``attn_device``: where attention runs ("cuda" for a plan; "cpu" for the simulation, whose ring attention uses
    the fused CPU kernel instead of explicit score blocks)."""
    mc = model_config
    tp, pp, zero1, chunks, sp = _layout_sizes(layout)
    b = dtype_bytes(mc.dtype)
    n = micro_bsz * seq_len // getattr(layout, "context", 1)  # a context rank's tokens: activations / C
    selective = selective_mode(checkpoint)
    full_layer = layer_activation_bytes(mc, n, tp, sp, attn_backend)
    # a selectively recomputed layer saves less, and rebuilds the difference during its backward
    layer_saved = layer_activation_bytes(mc, n, tp, sp, attn_backend, selective)
    selective_extra = full_layer - layer_saved
    kept_layer = layer_input_bytes(mc, n, tp, sp)
    hidden = kept_layer  # a (1, N / s, H) stage-to-stage tensor in the model dtype
    # a recomputed layer rebuilds its activations but its input, which the norm saves (that very storage)
    recompute_extra = full_layer - kept_layer
    # ring attention's backward holds score-sized blocks while the layer's output gradient is alive (the MLP's
    # gradients are freed by then): the larger of the two working sets
    explicit = attn_device != "cpu" or attn_backend == "reference"
    ring = ring_block_transient(mc, n, tp, layout, explicit)
    work = max(backward_working_set(mc, n, tp, sp), kept_layer + ring)
    head = head_memory(mc, n, tp, sp, fused_loss)
    last_virtual = pp * chunks - 1
    interleaved = pp > 1 and chunks > 1

    params = stage_params(mc, layout, pipeline_rank)
    chunk_list: List[ChunkMemory] = []
    for c, layer_range in enumerate(partition_layers(mc.num_layers, pp, chunks)[pipeline_rank]):
        virtual = c * pp + pipeline_rank
        first, last = virtual == 0, virtual == last_virtual
        layers = len(layer_range)
        recomputed = checkpointed_layer_count(checkpoint, layers)
        saved = recomputed * kept_layer + (layers - recomputed) * layer_saved
        if layers:
            saved += rotary_bytes(mc, n)  # one cos/sin per chunk forward, saved by its layers (kept by recomputed ones)
        if first:
            saved += embedding_saved_bytes(n, tp)
        else:
            # the received input is referenced by the schedule until its backward (interleaved: until the step
            # ends, counted apart); the first layer saves (or, recomputed, keeps) that very storage
            if interleaved:
                saved -= hidden if layers else 0.0
            else:
                saved += 0.0 if layers else hidden
        head_saved = forward_extra = head_backward_extra = 0.0
        if last:
            head_saved = head.saved
            forward_extra, head_backward_extra = head.forward_extra, head.backward_extra
        else:
            saved += hidden  # the output sent downstream stays referenced until its backward
        saved += head_saved
        layer_backward_extra = work + (recompute_extra if recomputed else selective_extra)
        chunk_list.append(
            ChunkMemory(
                virtual,
                layers,
                recomputed,
                first,
                last,
                saved,
                head_saved,
                forward_extra,
                head_backward_extra,
                layer_backward_extra,
            )
        )

    # Replay the schedule: the peak of (activations held) + (transient of the running step). Stage-to-stage
    # tensors the schedules keep referenced beyond their micro-batch: the interleaved schedule holds every
    # exchange (received activations, their input gradients, received output gradients) until the step ends;
    # 1F1B keeps the previous micro-batch's input gradient and output gradient in its loop variables.
    held = retained = linger = 0.0
    count = 0
    best = (0.0, 0.0, 0)  # (activations, transient, in flight)

    def consider(base: float, extra: float) -> None:
        nonlocal best
        if base + extra > best[0] + best[1]:
            best = (base, extra, count)

    for kind, c, _ in schedule_order(pp, pipeline_rank, chunks, micro_num):
        chunk = chunk_list[c]
        if kind == "F":
            if interleaved and not chunk.first:
                retained += hidden
            held += chunk.saved
            count += 1
            consider(held + retained + linger, chunk.forward_extra)
        else:
            if interleaved and not chunk.last:
                retained += hidden
            if chunk.last:
                consider(held + retained + linger, chunk.head_backward_extra)
            consider(held - chunk.head_saved + retained + linger, chunk.layer_backward_extra)
            held -= chunk.saved
            count -= 1
            if interleaved and not chunk.first:
                retained += hidden
            if pp > 1 and not interleaved:
                linger = hidden * ((not chunk.first) + (not chunk.last))

    weights = b * params
    gradients = 4 * params + (4 * params / zero1 if zero1 > 1 else 0.0)
    optimizer = 12 * params / zero1
    return StageMemory(pipeline_rank, params, weights, gradients, optimizer, best[0], best[1], best[2], chunk_list)


def stage_memories(
    model_config: Any,
    layout: Any,
    micro_bsz: int,
    seq_len: int,
    micro_num: int,
    checkpoint: Checkpoint = False,
    attn_backend: Optional[str] = None,
    fused_loss: bool = True,
) -> List[StageMemory]:
    """`stage_memory` of every pipeline rank."""
    return [
        stage_memory(model_config, layout, micro_bsz, seq_len, micro_num, checkpoint, r, attn_backend, fused_loss)
        for r in range(layout.pipeline)
    ]


def peak_stage(
    model_config: Any,
    layout: Any,
    micro_bsz: int,
    seq_len: int,
    micro_num: int,
    checkpoint: Checkpoint = False,
    attn_backend: Optional[str] = None,
    fused_loss: bool = True,
) -> StageMemory:
    """The most loaded pipeline rank (largest total)."""
    stages = stage_memories(model_config, layout, micro_bsz, seq_len, micro_num, checkpoint, attn_backend, fused_loss)
    return max(stages, key=lambda stage: stage.total)


def memory_per_device(
    model_config: Any,
    layout: Any,
    micro_bsz: int,
    seq_len: int,
    micro_num: int,
    checkpoint: Checkpoint = False,
    attn_backend: Optional[str] = None,
    fused_loss: bool = True,
) -> Dict[str, float]:
    """Peak bytes per device of the most loaded pipeline stage: ``weights``, ``gradients``, ``optimizer``,
    ``activations`` (saved, in flight at the peak), ``transient`` (loss or recomputation at the peak) and
    ``total``. ``checkpoint`` is ``model.checkpoint`` (False, True, a fraction of layers, ``"attn"`` or ``"mlp"``);
    ``attn_backend`` defaults to the model config's (`planned_attn_backend`); ``fused_loss`` is
    ``model.fused_loss``. See the module docstring."""
    stage = peak_stage(model_config, layout, micro_bsz, seq_len, micro_num, checkpoint, attn_backend, fused_loss)
    return stage.as_dict()


__all__ = [
    "ChunkMemory",
    "StageMemory",
    "STATE_KEYS",
    "stage_memory",
    "stage_memories",
    "peak_stage",
    "memory_per_device",
]
