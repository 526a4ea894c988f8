"""Activation bytes of one micro-batch: what a decoder layer, the embedding and the head/loss save for backward,
and their transients. `internlm.planning.memory` puts them together per pipeline stage.

Counted from this code base, not from a rule of thumb: the per-layer activation table below lists every tensor
that `internlm.model.modeling` (as tensor-parallelised by `internlm.parallel`) saves for backward, checked in
``tests/planning/test_memory_model.py`` against the storages caught by ``torch.autograd.graph.saved_tensors_hooks``.

Notation: ``N = micro_bsz * seq_len`` tokens of one micro-batch; ``T`` tensor size; ``s = T`` with sequence
parallelism, else 1 (the residual stream is sharded over the sequence); ``b`` bytes of the model dtype (2 for
bf16/fp16, 4 for fp32); ``H`` hidden, ``F`` MLP intermediate, ``D`` head dim, ``V`` vocab; ``A = heads / T``
query heads of this rank; ``K`` its kv heads (``kv_heads / T`` when they split, else 1: `ReplicatedKVLinear`
computes the one kv head its query heads read).

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

**Activation checkpointing** (``model.checkpoint``, applied by `internlm.train.activation_checkpoint`, counted by
`internlm.planning.recompute`):

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

**Backward working set** of a layer: the gradient of its output (``b N H / s``) and, at the MLP's product, two
``(N, F / T)`` gradients more than the saved tensor already freed: ``2 b N F / T + b N H / s``; a recomputed layer
adds its rebuilt activations (``layer`` minus its input when the norm saves that very storage, fp32).

The attention backend is the one a GPU run would use (`planned_attn_backend`: the model's own rule for "auto").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from internlm.kernels import default_chunk_tokens
from internlm.model.attention import resolve_backend

from .params import dtype_bytes
from .recompute import Checkpoint, checkpointed_layer_count, selective_mode


def local_heads(model_config: Any, tensor: int) -> Tuple[int, int]:
    """``(A, K)``: query heads and kv heads one tensor rank computes."""
    heads = model_config.num_attention_heads
    kv_heads = model_config.num_kv_attention_heads or heads
    kv_local = kv_heads // tensor if kv_heads % tensor == 0 else 1
    return heads // tensor, kv_local


def planned_attn_backend(model_config: Any, attn_backend: Optional[str] = None) -> str:
    """The backend the estimate assumes: ``attn_backend`` or the config's, as the model's rule resolves it for a CUDA
    device with flash-attn installed (`internlm.model.attention.resolve_backend`: ``auto`` is flash for fp16/bf16,
    else sdpa; unknown names rejected). An explicit ``flash`` is planned as given, even for a dtype a run would
    refuse. flash and sdpa save the same tensors; ``reference`` saves more."""
    backend = attn_backend or getattr(model_config, "attn_backend", "auto")
    if backend == "flash":
        return backend
    return resolve_backend(backend, "cuda", model_config.dtype, flash_installed=True)


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
    backend = planned_attn_backend(mc, attn_backend)
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


def ring_block_transient(
    model_config: Any, tokens: int, tensor: int, layout: Any, explicit_blocks: bool = True
) -> float:
    """Score-sized fp32 tensors of ring attention's explicit block backward (`internlm.parallel.context.block`, what
    the ring runs on CUDA and with the reference backend; ``explicit_blocks=False``: the fused CPU kernel, which
    holds none): ``tokens`` per context rank are two zigzag chunks of ``c = tokens / 2``; every (query chunk, key
    chunk) rectangle is at most c x c and ``block_backward`` holds up to four (A, c, c) tensors in the accumulation
    dtype at once (P, dP, dP - delta, dS): ``4 * acc * A * c^2`` (acc 4, or 8 for fp64 models). 0 without ring
    context parallelism."""
    ring = getattr(layout, "context", 1) > 1 and getattr(layout, "context_mode", "ring") == "ring"
    if not ring or not explicit_blocks:
        return 0.0
    heads, _ = local_heads(model_config, tensor)
    acc = max(4, dtype_bytes(model_config.dtype))
    chunk = tokens / 2
    return 4.0 * acc * heads * chunk * chunk


def backward_working_set(model_config: Any, tokens: int, tensor: int = 1, sequence_parallel: bool = False) -> float:
    """Gradients alive inside one layer's backward on top of its saved tensors: the gradient of the layer output
    (``b N H / s``) and, at the MLP's product, two ``(N, F / T)`` gradients more than the saved input freed."""
    b = dtype_bytes(model_config.dtype)
    return 2 * b * tokens * model_config.intermediate_size / tensor + layer_input_bytes(
        model_config, tokens, tensor, sequence_parallel
    )


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
    recomputed = checkpointed_layer_count(checkpoint, mc.num_layers)
    layers = recomputed * layer_input_bytes(mc, n, tensor, sp)
    selective = selective_mode(checkpoint)
    layers += (mc.num_layers - recomputed) * layer_activation_bytes(mc, n, tensor, sp, attn_backend, selective)
    layers += rotary_bytes(mc, n)  # saved by the layers' rotary, or kept as an input of recomputed layers
    return layers + embedding_saved_bytes(n, tensor) + head_memory(mc, n, tensor, sp, fused_loss).saved


__all__ = [
    "HeadMemory",
    "planned_attn_backend",
    "local_heads",
    "layer_activation_terms",
    "layer_activation_bytes",
    "layer_input_bytes",
    "rotary_bytes",
    "embedding_saved_bytes",
    "head_memory",
    "backward_working_set",
    "ring_block_transient",
    "activation_bytes_per_micro_batch",
]
