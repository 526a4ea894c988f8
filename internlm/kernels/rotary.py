"""Rotary position embedding, rotate-half convention (Hugging Face InternLM / LLaMA), as the model's
``apply_rotary(x, position_ids, base)``, split so that the angles are computed once and shared by every layer:

    cos, sin = rotary_cos_sin(position_ids, head_dim, base)     # once per forward: (tokens, head_dim / 2)
    q = apply_rotary(q, cos, sin)                                # per layer, q: (tokens, heads, head_dim)

Angles: inv_freq_i = base^(-2i / D), theta_{t,i} = position_t * inv_freq_i for i < D / 2. With x = [x1, x2]
(the two halves of the head dim), c = cos theta, s = sin theta, in fp32:

    forward:   y1 = x1 c - x2 s,    y2 = x2 c + x1 s             (rotation by +theta)
    backward: dx1 = dy1 c + dy2 s,  dx2 = dy2 c - dy1 s          (rotation by -theta)

Nothing is saved but cos and sin (shared with every other layer); they get no gradient.

Scaling (``scaling``, a model's ``rope_scaling``, as transformers' Llama): ``linear`` divides inv_freq by the factor
F; ``dynamic`` (NTK) leaves it unchanged while the forward's longest sequence L (``seq_len``: max position + 1) is at
most ``max_position_embeddings`` M, and beyond it uses base' = base * (F * L / M - (F - 1)) ** (D / (D - 2)).

The rotation runs as the torch custom op ``internlm::rotary`` (fake implementation: an empty like x).
"""

from typing import Any, Mapping, Optional

import torch

from .dispatch import TRITON_DTYPES, acc_dtype, load_triton, use_triton


def dynamic_ntk_base(base: float, head_dim: int, factor: float, max_position_embeddings: int, seq_len: int) -> float:
    """The dynamic NTK base for a forward whose longest sequence is ``seq_len`` (L):
    base * (F * L / M - (F - 1)) ** (D / (D - 2)) for L > M = ``max_position_embeddings``, else ``base``."""
    if seq_len <= max_position_embeddings:
        return base
    scale = factor * seq_len / max_position_embeddings - (factor - 1)
    return base * scale ** (head_dim / (head_dim - 2))


def rotary_cos_sin(
    position_ids: torch.Tensor,
    head_dim: int,
    base: float,
    dtype: torch.dtype = torch.float32,
    scaling: Optional[Mapping[str, Any]] = None,
    max_position_embeddings: Optional[int] = None,
    seq_len: Optional[int] = None,
) -> tuple:
    """(cos, sin), each (tokens, head_dim // 2) of ``dtype``, for flattened ``position_ids`` (tokens,).

    Computed in fp32 exactly as the model does; keep the default fp32 ``dtype`` for values identical to the model
    (a lower precision halves this small buffer but rounds the angles' cos/sin). ``scaling``: None, or
    ``{"type": "linear" | "dynamic", "factor": F}``; dynamic needs ``max_position_embeddings`` and ``seq_len``
    (the forward's longest sequence, max position + 1, a host int: no device sync here).
    """
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
    device = position_ids.device
    kind = None if scaling is None else scaling["type"]
    if kind == "dynamic":
        if max_position_embeddings is None or seq_len is None:
            raise ValueError("dynamic rope scaling needs max_position_embeddings and seq_len (max position + 1)")
        base = dynamic_ntk_base(base, head_dim, float(scaling["factor"]), max_position_embeddings, seq_len)
    elif kind not in (None, "linear"):
        raise ValueError(f"unknown rope scaling type {kind!r}; use 'dynamic', 'linear' or None")
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    freqs = position_ids.reshape(-1).to(torch.float32)[:, None] * inv_freq[None, :]
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def rotary_eager(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Reference: x (tokens, heads, D), cos/sin (tokens, D/2) -> x rotated by +theta (-theta if ``inverse``)."""
    acc = acc_dtype(x.dtype)
    c, s = cos.to(acc)[:, None, :], sin.to(acc)[:, None, :]
    if inverse:
        s = -s
    x1, x2 = x.to(acc).chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


@torch.library.custom_op("internlm::rotary", mutates_args=())
def rotary_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool, kernel: bool) -> torch.Tensor:
    """x rotated by +theta (-theta if ``inverse``): the Triton kernel if ``kernel`` (contiguous inputs) or eager."""
    if kernel:
        return load_triton().rotary(x, cos, sin, inverse)
    return rotary_eager(x, cos, sin, inverse)


@rotary_op.register_fake
def _(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool, kernel: bool) -> torch.Tensor:
    return x.new_empty(x.shape)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    supported = x.dtype in TRITON_DTYPES and cos.dtype in TRITON_DTYPES and sin.dtype in TRITON_DTYPES
    if use_triton("apply_rotary", x, cos, sin, supported=supported):
        return rotary_op(x.contiguous(), cos.contiguous(), sin.contiguous(), inverse, True)
    return rotary_op(x, cos, sin, inverse, False)


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] % 2 or cos.shape != (x.shape[0], x.shape[-1] // 2) or sin.shape != cos.shape:
            raise ValueError(
                f"apply_rotary: x must be (tokens, heads, head_dim) with cos/sin (tokens, head_dim / 2); got x "
                f"{tuple(x.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}"
            )
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, sin, inverse=True), None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (tokens, heads, head_dim) by the angles of `rotary_cos_sin`; returns x's dtype.

    Under ``torch.compile``: the differentiable eager formula (`rotary_eager`), which inductor fuses itself."""
    if torch.compiler.is_compiling():
        return rotary_eager(x, cos, sin)
    return RotaryFunction.apply(x, cos, sin)


__all__ = ["RotaryFunction", "apply_rotary", "dynamic_ntk_base", "rotary_cos_sin", "rotary_eager", "rotary_op"]
