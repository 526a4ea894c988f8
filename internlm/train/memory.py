"""Memory per device of a training run: model states, the activations autograd saves, and the loss peak.

Counted from this code base, not from a rule of thumb: the per-layer activation table below lists every tensor
that `internlm.model.modeling` (as tensor-parallelised by `internlm.parallel`) saves for backward, checked in
``tests/test_memory_model.py`` against the storages caught by ``torch.autograd.graph.saved_tensors_hooks`` and
against the peak of live tensor storages over real CPU training steps.

Notation: ``N = micro_bsz * seq_len`` tokens of one micro-batch; ``T`` tensor size; ``s = T`` with sequence
parallelism, else 1 (the residual stream is sharded over the sequence); ``b`` bytes of the model dtype (2 for
bf16/fp16, 4 for fp32); ``H`` hidden, ``F`` MLP intermediate, ``D`` head dim, ``V`` vocab; ``A = heads / T``
query heads of this rank; ``K`` its kv heads (``kv_heads / T`` when they split, else 1: `ReplicatedKVLinear`
computes the one kv head its query heads read); ``P`` parameters held by the device (its pipeline stage's
layers, plus the embedding on the first and the final norm and head on the last stage, tensor-sharded as
`internlm.parallel.parallelize_model` places them); ``Z`` zero1 size.

**Model states** (`HybridZeroOptimizer`, `FlatBuffer`):

    weights     b * P           parameters are views into one flat buffer per kind, in the model dtype
    gradients   4 * P           fp32 accumulation buffer (every micro-batch's gradient is added into it in fp32)
              + 4 * P / Z       the reduced slice this rank owns (a separate tensor only when Z > 1)
    optimizer   12 * P / Z      fp32 master slice + AdamW exp_avg + exp_avg_sq (allocated at the first update)

**Activations saved per decoder layer and micro-batch** (the tensors autograd keeps between forward and
backward; parameters excluded; a storage shared by several ops counted once), with the fused kernels of
`internlm.kernels` that the model runs (Triton on GPUs, their eager reference elsewhere: the same tensors saved):

| tensor | saved by | bytes |
| --- | --- | --- |
| layer input (the residual stream, model dtype) | ``rms_norm`` of input_layernorm | b N H / s |
| 1 / rms of every token (fp32) | ``rms_norm`` | 4 N / s |
| norm output (all-gathered to N tokens under SP) | q_proj, k_proj, v_proj | b N H |
| q and k after rotary, v | the attention kernel | b N D (A + 2 K) |
| attention output (one storage) | the attention kernel and o_proj | b N D A |
| softmax log-sum-exp (fp32; sdpa and flash kernels) | the attention kernel | 4 N A |
| residual after attention | ``rms_norm`` of post_attention_layernorm | b N H / s |
| 1 / rms of every token | ``rms_norm`` | 4 N / s |
| norm output (gathered under SP) | gate_proj, up_proj | b N H |
| gate_proj and up_proj outputs | ``swiglu`` (silu is recomputed) | 2 b N F / T |
| ``silu(gate) * up`` | down_proj | b N F / T |

    layer = 2 b N H / s + 2 b N H + 8 N / s + b N D (2 A + 2 K) + 4 N A + 3 b N F / T

plus, once per model chunk and micro-batch, the rotary cos and sin (fp32, (N, D / 2) each: ``4 N D``), computed
once per forward and saved by every layer's rotary (one storage). Not saved: fp32 copies of the residual stream
(the norm keeps x and one fp32 scalar per token), the projections' outputs before rotary, ``silu(gate)``, the
o_proj / down_proj outputs and the collectives' buffers (the tensor-parallel regions save nothing). For bf16, MHA,
T = s = 1 this is 16 N H + 6 N F (+ small terms), e.g. 32 N H for F = 8/3 H, against Korthikanti's 34 N H.
Backends: ``flash`` (flash-attn varlen, the GPU default) and ``sdpa`` with equal-length documents (torch's
fused causal kernel) save the same tensors. ``sdpa`` over packed documents of unequal length gathers them into
buckets of right-padded documents and saves the gathered q/k/v/output instead (about ``b N D (2 A + 2 K)`` more
per layer plus the padding, at most 1.5x); ``reference`` (tests only) saves fp32 q/k/v and the (A, N, N) fp32
probabilities.

**Activation checkpointing** (`internlm.train.activation_checkpoint`, ``model.checkpoint``):

| setting | recomputed | what it keeps | recompute transient (its backward) |
| --- | --- | --- | --- |
| True / fraction f | every layer / the first ``round(f L)`` of a chunk | input ``b N H / s`` | ``layer - b N H / s`` |
| ``"attn"`` | attention's core, every layer | q, k, v (as without) | ``b N D A + 4 N A`` |
| ``"mlp"`` | the MLP, every layer | its input, the norm output (as without) | ``3 b N F / T`` |

so ``"attn"`` saves ``4 N A`` per layer (with ``sdpa`` over packed documents also the padded gathered copies;
with ``reference`` the probabilities) and ``"mlp"`` ``3 b N F / T`` per layer, for one more attention (or MLP
and, under tensor parallelism, its all-reduce) forward per layer.

**Head and loss** (last pipeline stage, per micro-batch; ``V_l = V / T`` rows of the head on this rank).

Fused (``model.fused_loss``, the default: `internlm.kernels.chunked_linear_cross_entropy` over chunks of
``c = min(N, default_chunk_tokens(V_l))`` tokens, at most 256 MiB of fp32 logits):

    saved          final norm b N H / s + 4 N / s, and the head's gradients computed in the forward: d hidden
                   b N H and d lm_head b V_l H
    forward peak   + one chunk's logits b c V_l and one fp32 working copy 4 c V_l (the eager fallback; the Triton
                   kernels need only the logits)
    backward peak  nothing more (the gradients are scaled in place)

Unfused (``model.fused_loss=False``; ``E = N V_l`` logits of this rank):

    saved          final norm b N H / s + 4 N / s, lm_head input b N H, the fp32 softmax (T > 1) or log-softmax
                   (T = 1) 4 E, labels 8 N
    forward peak   + the logits b E and, for T > 1 or a 16-bit model, one more fp32 copy 4 E (the ``.float()``
                   copy, or the shifted logits inside `vocab_parallel_cross_entropy`)
    backward peak  T = 1: + 8 E (the gradient of the log-softmax output and of its input, both fp32);
                   T > 1: + b E for a 16-bit model (the in-place fp32 gradient cast to the model dtype)

The head transient is the larger of the two peaks; the embedding saves its int64 ids (8 N, plus a boolean mask
N for T > 1).

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

**Backward working set** of a layer: the gradient of its output (``b N H / s``) and, at the MLP's product, two
``(N, F / T)`` gradients more than the saved tensor already freed: ``2 b N F / T + b N H / s``; a recomputed layer
adds its rebuilt activations (``layer`` minus its input when the norm saves that very storage, fp32).

**Peak per device** = weights + gradients + optimizer + max over the schedule of (activations held + transient of
the running step: the loss forward or backward, or one layer's backward working set and recomputation). The most
loaded pipeline rank is reported. Not counted: the CUDA context, NCCL and cuBLAS workspaces, allocator
fragmentation and kernels' internal scratch; leave headroom for them (``tools/plan.py`` counts a device as
fitting below 92% of its memory).

Every function takes ``fused_loss`` (default True, as ``model.fused_loss``); ``checkpoint`` is ``model.checkpoint``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

from internlm.kernels import default_chunk_tokens
from internlm.parallel.pipeline.partition import partition_layers

from .activation_checkpoint import checkpointed_layer_count
from .costs import dtype_bytes

Checkpoint = Union[bool, float, str, None]

STATE_KEYS = ("weights", "gradients", "optimizer")


# ---------------------------------------------------------------------------------------------- shapes
def local_heads(model_config: Any, tensor: int) -> Tuple[int, int]:
    """``(A, K)``: query heads and kv heads one tensor rank computes."""
    heads = model_config.num_attention_heads
    kv_heads = model_config.num_kv_attention_heads or heads
    kv_local = kv_heads // tensor if kv_heads % tensor == 0 else 1
    return heads // tensor, kv_local


def resolve_attn_backend(model_config: Any, attn_backend: Optional[str] = None) -> str:
    """The backend the estimate assumes: ``attn_backend`` or the config's; ``auto`` plans for a GPU: flash."""
    backend = attn_backend or getattr(model_config, "attn_backend", "auto")
    if backend == "auto":
        return "flash"
    if backend not in ("flash", "sdpa", "reference"):
        raise ValueError(f"unknown attention backend {backend!r}; use auto, flash, sdpa or reference")
    return backend


def layer_activation_terms(
    model_config: Any,
    tokens: int,
    tensor: int = 1,
    sequence_parallel: bool = False,
    attn_backend: Optional[str] = None,
    selective: Optional[str] = None,
) -> Dict[str, float]:
    """Bytes saved for backward by one decoder layer for one micro-batch of ``tokens`` tokens, by tensor (the
    table of the module docstring, grouped). ``selective``: ``"attn"`` or ``"mlp"`` (``model.checkpoint``) leaves
    out what the recomputed part saves; the tensors its checkpoint keeps (its inputs) stay."""
    mc = model_config
    n, h, f, d = tokens, mc.hidden_size, mc.intermediate_size, mc.head_dim
    b = dtype_bytes(mc.dtype)
    t = tensor
    s = t if sequence_parallel and t > 1 else 1
    a, k = local_heads(mc, t)
    backend = resolve_attn_backend(mc, attn_backend)
    out = {
        "norm inputs (2 norms)": 2 * b * n * h / s,
        "norm rstd (2 norms)": 2 * 4 * n / s,
        "norm outputs, projection inputs (2 norms)": 2 * b * n * h,
        "attention output": b * n * d * a,
    }
    if selective == "attn":  # the core's checkpoint keeps q, k, v; o_proj saves its output
        out["q, k, v"] = b * n * d * (a + 2 * k)
    elif backend == "reference":
        out["q, k, v (fp32 copies)"] = 4 * n * d * (a + 2 * k)
        out["attention probabilities + mask"] = 4 * a * n * n + n * n
    else:
        out["q, k, v"] = b * n * d * (a + 2 * k)
        out["softmax lse"] = 4 * n * a
    if selective != "mlp":  # the MLP's checkpoint keeps its input, the norm output, counted above
        out["mlp (gate, up, product)"] = 3 * b * n * f / t
    return out


def rotary_bytes(model_config: Any, tokens: int) -> float:
    """The rotary cos and sin of one micro-batch, fp32 (N, D / 2) each: once per model chunk (shared by its layers)."""
    return 4 * tokens * model_config.head_dim


def layer_activation_bytes(
    model_config: Any,
    tokens: int,
    tensor: int = 1,
    sequence_parallel: bool = False,
    attn_backend: Optional[str] = None,
    selective: Optional[str] = None,
) -> float:
    """Sum of `layer_activation_terms`: one decoder layer, one micro-batch, no recomputation (or the selective
    one of ``selective``)."""
    terms = layer_activation_terms(model_config, tokens, tensor, sequence_parallel, attn_backend, selective)
    return sum(terms.values())


def selective_mode(checkpoint: Checkpoint) -> Optional[str]:
    """``"attn"`` or ``"mlp"`` for a selective ``model.checkpoint``, else None."""
    return checkpoint if isinstance(checkpoint, str) else None


def layer_input_bytes(model_config: Any, tokens: int, tensor: int = 1, sequence_parallel: bool = False) -> float:
    """What a recomputed (checkpointed) layer keeps: its (1, N / s, H) input in the model dtype."""
    s = tensor if sequence_parallel and tensor > 1 else 1
    return dtype_bytes(model_config.dtype) * tokens * model_config.hidden_size / s


def embedding_saved_bytes(tokens: int, tensor: int = 1) -> float:
    """The embedding saves its int64 token ids (and, vocab-parallel, the boolean mask of foreign ids)."""
    return 8 * tokens + (tokens if tensor > 1 else 0)


@dataclass(frozen=True)
class HeadMemory:
    """Final norm, output head and loss of one micro-batch on the last pipeline stage (bytes)."""

    saved: float  # kept for backward
    forward_extra: float  # on top of ``saved`` at the forward peak (the loss computation)
    backward_extra: float  # on top of ``saved`` at the backward peak (the loss backward)

    @property
    def transient(self) -> float:
        return max(self.forward_extra, self.backward_extra)


def head_memory(
    model_config: Any, tokens: int, tensor: int = 1, sequence_parallel: bool = False, fused_loss: bool = True
) -> HeadMemory:
    """The head/loss terms of the module docstring (label smoothing 0), fused or not (``model.fused_loss``)."""
    mc = model_config
    n, h, b, t = tokens, mc.hidden_size, dtype_bytes(mc.dtype), tensor
    s = t if sequence_parallel and t > 1 else 1
    vocab_local = mc.vocab_size // t
    final_norm = b * n * h / s + 4 * n / s
    if fused_loss:
        chunk = min(n, default_chunk_tokens(vocab_local))
        saved = final_norm + b * n * h + b * vocab_local * h
        return HeadMemory(saved, (b + 4) * chunk * vocab_local, 0.0)
    e = n * vocab_local
    saved = final_norm + b * n * h + 4 * e + 8 * n
    forward_extra = b * e + (4 * e if (t > 1 or b < 4) else 0.0)
    backward_extra = 8 * e if t == 1 else (b * e if b < 4 else 0.0)
    return HeadMemory(saved, forward_extra, backward_extra)


# ---------------------------------------------------------------------------------------------- parameters
def layer_params(model_config: Any, tensor: int = 1) -> int:
    """Parameters of one decoder layer held by one tensor rank (`parallelize_model`'s placement)."""
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


def checkpointed_layers(setting: Checkpoint, layers: int) -> int:
    """How many of a chunk's ``layers`` `apply_activation_checkpointing` recomputes whole for ``model.checkpoint``
    (none for the selective modes ``"attn"`` / ``"mlp"``)."""
    return checkpointed_layer_count(setting, layers)


# ---------------------------------------------------------------------------------------------- schedule
def schedule_events(pipeline: int, rank: int, num_chunks: int, micro_num: int) -> List[Tuple[str, int]]:
    """The order of forward ("F") and backward ("B") steps of one pipeline rank, with their model chunk, as
    `internlm.parallel.pipeline` runs them (no pipeline, 1F1B, or interleaved 1F1B)."""
    if pipeline == 1:
        return [ev for _ in range(micro_num) for ev in (("F", 0), ("B", 0))]
    if num_chunks == 1:
        warmup = min(pipeline - rank - 1, micro_num)
        events = [("F", 0)] * warmup
        for _ in range(micro_num - warmup):
            events += [("F", 0), ("B", 0)]
        return events + [("B", 0)] * warmup
    total = micro_num * num_chunks

    def chunk_of(k: int) -> int:
        return (k % (pipeline * num_chunks)) // pipeline

    warmup = min(total, 2 * (pipeline - rank - 1) + (num_chunks - 1) * pipeline)
    events = [("F", chunk_of(k)) for k in range(warmup)]
    for i in range(total - warmup):
        events += [("F", chunk_of(warmup + i)), ("B", num_chunks - 1 - chunk_of(i))]
    return events + [("B", num_chunks - 1 - chunk_of(k)) for k in range(total - warmup, total)]


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


def backward_working_set(model_config: Any, tokens: int, tensor: int = 1, sequence_parallel: bool = False) -> float:
    """Gradients alive inside one layer's backward on top of its saved tensors: the gradient of the layer output
    (``b N H / s``) and, at the MLP's product, two ``(N, F / T)`` gradients more than the saved input freed."""
    b = dtype_bytes(model_config.dtype)
    return 2 * b * tokens * model_config.intermediate_size / tensor + layer_input_bytes(
        model_config, tokens, tensor, sequence_parallel
    )


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
) -> StageMemory:
    """Peak memory of one device on ``pipeline_rank`` (tensor rank 0; every tensor rank holds the same bytes)."""
    mc = model_config
    tp, pp, zero1, chunks, sp = _layout_sizes(layout)
    b = dtype_bytes(mc.dtype)
    n = micro_bsz * seq_len
    selective = selective_mode(checkpoint)
    full_layer = layer_activation_bytes(mc, n, tp, sp, attn_backend)
    # a selectively recomputed layer saves less, and rebuilds the difference during its backward
    layer_saved = layer_activation_bytes(mc, n, tp, sp, attn_backend, selective)
    selective_extra = full_layer - layer_saved
    kept_layer = layer_input_bytes(mc, n, tp, sp)
    hidden = kept_layer  # a (1, N / s, H) stage-to-stage tensor in the model dtype
    # a recomputed layer rebuilds its activations but its input, which the norm saves (that very storage)
    recompute_extra = full_layer - kept_layer
    work = backward_working_set(mc, n, tp, sp)
    head = head_memory(mc, n, tp, sp, fused_loss)
    per_layer = layer_params(mc, tp)
    embedding = mc.vocab_size * mc.hidden_size // tp
    last_virtual = pp * chunks - 1
    interleaved = pp > 1 and chunks > 1

    params = 0
    chunk_list: List[ChunkMemory] = []
    for c, layer_range in enumerate(partition_layers(mc.num_layers, pp, chunks)[pipeline_rank]):
        virtual = c * pp + pipeline_rank
        first, last = virtual == 0, virtual == last_virtual
        layers = len(layer_range)
        recomputed = checkpointed_layers(checkpoint, layers)
        saved = recomputed * kept_layer + (layers - recomputed) * layer_saved
        if layers:
            saved += rotary_bytes(mc, n)  # one cos/sin per chunk forward, saved by its layers (kept by recomputed ones)
        params += layers * per_layer
        if first:
            params += embedding
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
            params += mc.hidden_size + embedding  # final norm + lm_head
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

    for kind, c in schedule_events(pp, pipeline_rank, chunks, micro_num):
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
    ``attn_backend`` defaults to the model config's (``auto``: flash, planning for a GPU); ``fused_loss`` is
    ``model.fused_loss``. See the module docstring."""
    stage = peak_stage(model_config, layout, micro_bsz, seq_len, micro_num, checkpoint, attn_backend, fused_loss)
    return stage.as_dict()


def activation_bytes_per_micro_batch(
    model_config: Any,
    micro_bsz: int,
    seq_len: int,
    tensor: int = 1,
    sequence_parallel: bool = False,
    checkpoint: Checkpoint = False,
    attn_backend: Optional[str] = None,
    fused_loss: bool = True,
) -> float:
    """Bytes saved for backward by a whole single-stage model for one micro-batch (every layer, the embedding
    ids and the head's saved tensors; no transient): what ``saved_tensors_hooks`` sees, plus the inputs that
    recomputed layers and selectively recomputed attention cores / MLPs keep."""
    mc = model_config
    n = micro_bsz * seq_len
    sp = bool(sequence_parallel and tensor > 1)
    recomputed = checkpointed_layers(checkpoint, mc.num_layers)
    layers = recomputed * layer_input_bytes(mc, n, tensor, sp)
    selective = selective_mode(checkpoint)
    layers += (mc.num_layers - recomputed) * layer_activation_bytes(mc, n, tensor, sp, attn_backend, selective)
    layers += rotary_bytes(mc, n)  # saved by the layers' rotary, or kept as an input of recomputed layers
    return layers + embedding_saved_bytes(n, tensor) + head_memory(mc, n, tensor, sp, fused_loss).saved


def gib(n: float) -> float:
    return n / 2**30


def format_gib(n: float) -> str:
    return f"{gib(n):,.1f} GiB"


__all__ = [
    "HeadMemory",
    "ChunkMemory",
    "StageMemory",
    "local_heads",
    "resolve_attn_backend",
    "layer_activation_terms",
    "layer_activation_bytes",
    "layer_input_bytes",
    "rotary_bytes",
    "selective_mode",
    "embedding_saved_bytes",
    "head_memory",
    "layer_params",
    "checkpointed_layers",
    "schedule_events",
    "stage_memory",
    "stage_memories",
    "peak_stage",
    "memory_per_device",
    "activation_bytes_per_micro_batch",
    "backward_working_set",
    "format_gib",
]
