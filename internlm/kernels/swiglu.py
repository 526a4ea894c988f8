"""Fused SwiGLU activation: ``swiglu(gate, up) = silu(gate) * up`` (the model's ``F.silu(gate_proj(x)) * up_proj(x)``).

With s = sigmoid(gate), in fp32:

    forward:  y     = gate * s * up
    backward: dgate = dy * up * s * (1 + gate * (1 - s))
              dup   = dy * gate * s

Only gate and up are saved (silu is recomputed in the backward); no (tokens, intermediate) activation is kept.
The eager path's forward is exactly ``F.silu(gate) * up``; the Triton kernel rounds once instead of twice
(identical in fp32 up to the last ulp, within one bf16 ulp in bf16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import TRITON_DTYPES, acc_dtype, load_triton, use_triton


def swiglu_backward_eager(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """(dgate, dup) with one (tokens, F) temporary besides the two results (fp32 inputs: no copies)."""
    acc = acc_dtype(gate.dtype)
    g, u, d = gate.to(acc), up.to(acc), dy.to(acc)
    sig = torch.sigmoid(g)
    dup = torch.mul(d, g).mul_(sig)  # dy * silu(g)
    tmp = torch.mul(g, sig)
    tmp.addcmul_(tmp, sig, value=-1.0)  # silu(g) (1 - s)
    dgate = sig.add_(tmp).mul_(d).mul_(u)  # dy * up * (s + silu(g) (1 - s)) = dy * up * s (1 + g (1 - s))
    del tmp
    return dgate.to(gate.dtype), dup.to(up.dtype)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if gate.shape != up.shape:
            raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
        supported = gate.dtype in TRITON_DTYPES and up.dtype == gate.dtype
        ctx.triton_path = use_triton("swiglu", gate, up, supported=supported)
        if ctx.triton_path:
            gate, up = gate.contiguous(), up.contiguous()
            y = load_triton().swiglu_fwd(gate, up)
        else:
            y = F.silu(gate) * up
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        if ctx.triton_path:
            return load_triton().swiglu_bwd(dy.contiguous(), gate, up)
        return swiglu_backward_eager(dy, gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for same-shape ``gate`` and ``up``; see the module docstring.

    Under ``torch.compile``: the plain ``F.silu(gate) * up``, which inductor fuses (and recomputes) itself."""
    if torch.compiler.is_compiling():
        return F.silu(gate) * up
    return SwiGLUFunction.apply(gate, up)


__all__ = ["SwiGLUFunction", "swiglu", "swiglu_backward_eager"]
