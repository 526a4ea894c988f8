"""Fused SwiGLU activation: ``swiglu(gate, up) = silu(gate) * up`` (the model's ``F.silu(gate_proj(x)) * up_proj(x)``).

With s = sigmoid(gate), in fp32:

    forward:  y     = gate * s * up
    backward: dgate = dy * up * s * (1 + gate * (1 - s))
              dup   = dy * gate * s

Only gate and up are saved (silu is recomputed in the backward); no (tokens, intermediate) activation is kept.
The eager path's forward is exactly ``F.silu(gate) * up``; the Triton kernel rounds once instead of twice
(identical in fp32 up to the last ulp, within one bf16 ulp in bf16).

Forward and backward run as the torch custom ops ``internlm::swiglu_fwd`` / ``internlm::swiglu_bwd``.
"""

from typing import Tuple

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


@torch.library.custom_op("internlm::swiglu_fwd", mutates_args=())
def swiglu_fwd_op(gate: torch.Tensor, up: torch.Tensor, kernel: bool) -> torch.Tensor:
    """silu(gate) * up: the Triton kernel if ``kernel`` (contiguous inputs), else ``F.silu(gate) * up``."""
    return load_triton().swiglu_fwd(gate, up) if kernel else F.silu(gate) * up


@swiglu_fwd_op.register_fake
def _(gate: torch.Tensor, up: torch.Tensor, kernel: bool) -> torch.Tensor:
    return torch.empty_like(gate)


@torch.library.custom_op("internlm::swiglu_bwd", mutates_args=())
def swiglu_bwd_op(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, kernel: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup) from the saved gate and up."""
    return load_triton().swiglu_bwd(dy, gate, up) if kernel else swiglu_backward_eager(dy, gate, up)


@swiglu_bwd_op.register_fake
def _(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, kernel: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(gate), torch.empty_like(up)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if gate.shape != up.shape:
            raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
        supported = gate.dtype in TRITON_DTYPES and up.dtype == gate.dtype
        ctx.triton_path = use_triton("swiglu", gate, up, supported=supported)
        if ctx.triton_path:
            gate, up = gate.contiguous(), up.contiguous()
        y = swiglu_fwd_op(gate, up, ctx.triton_path)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        return swiglu_bwd_op(dy.contiguous() if ctx.triton_path else dy, gate, up, ctx.triton_path)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for same-shape ``gate`` and ``up``; see the module docstring.

    Under ``torch.compile``: the plain ``F.silu(gate) * up``, which inductor fuses (and recomputes) itself."""
    if torch.compiler.is_compiling():
        return F.silu(gate) * up
    return SwiGLUFunction.apply(gate, up)


__all__ = ["SwiGLUFunction", "swiglu", "swiglu_backward_eager", "swiglu_bwd_op", "swiglu_fwd_op"]
