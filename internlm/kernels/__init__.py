"""Fused kernels for the non-matmul work of the decoder and the loss, each with an eager (pure torch) reference
that is also the fallback (CPU, no triton, unsupported dtype or shape); `dispatch` picks the backend per call.

    from internlm.kernels import apply_rotary, chunked_linear_cross_entropy, rms_norm, rotary_cos_sin, swiglu

    y = rms_norm(x, weight, eps)                             # F.rms_norm(x.float(), (H,), eps).to(x.dtype) * weight
    cos, sin = rotary_cos_sin(position_ids, head_dim, base)  # once per forward, shared by every layer
    q = apply_rotary(q, cos, sin)                            # q: (tokens, heads, head_dim)
    a = swiglu(gate, up)                                     # F.silu(gate) * up
    loss_sum = chunked_linear_cross_entropy(hidden, lm_head.weight, labels, label_smoothing=eps)  # shard=: vocab split

See docs/kernels.md for the formulas, the dispatch rules and the integration plan. No kernel knows a process group:
a vocab-split head passes a `VocabShard` whose ``combine`` (`internlm.parallel.cross_entropy`) does the collective.
"""

from .cross_entropy import VocabShard, chunked_linear_cross_entropy, default_chunk_tokens
from .dispatch import current_backend, kernel_backend, set_backend
from .rmsnorm import rms_norm
from .rotary import apply_rotary, rotary_cos_sin
from .swiglu import swiglu

__all__ = [
    "VocabShard",
    "apply_rotary",
    "chunked_linear_cross_entropy",
    "current_backend",
    "default_chunk_tokens",
    "kernel_backend",
    "rms_norm",
    "rotary_cos_sin",
    "set_backend",
    "swiglu",
]
