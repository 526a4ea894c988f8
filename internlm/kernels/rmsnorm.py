"""Fused RMSNorm: ``rms_norm(x, weight, eps)``, the same values as the model's RMSNorm,

    y = F.rms_norm(x.float(), (H,), eps=eps).to(x.dtype) * weight

Forward, per row of H values (fp32 arithmetic):

    rstd = 1 / sqrt(mean_j x_j^2 + eps)          (saved, fp32, one per row)
    n    = x * rstd                                (rounded to x's dtype, as the model does)
    y    = n * weight                              (dtype: promote(x.dtype, weight.dtype))

Backward, with g = dy * weight and n recomputed from the saved x and rstd:

    dx      = rstd * (g - n * mean_j(g_j n_j))
    dweight = sum over rows of dy * n              (accumulated in fp32, returned in weight's dtype)

Only x (in its own dtype) and rstd are saved: never an fp32 copy of x. Under ``torch.compile`` the function runs
the same formula as plain torch ops (`rms_norm_reference`) for inductor to fuse.
"""

from __future__ import annotations

from typing import Tuple

import torch

from .dispatch import TRITON_DTYPES, acc_dtype, load_triton, use_triton

_MAX_TRITON_HIDDEN = 32768  # one row is one block of the kernel


def rms_norm_forward_eager(x2d: torch.Tensor, weight: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference forward on (M, H) rows -> (y, rstd); bit-identical to the model's formula."""
    xf = x2d.to(acc_dtype(x2d.dtype))
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = (xf * rstd).to(x2d.dtype) * weight
    return y, rstd.squeeze(-1)


def rms_norm_backward_eager(dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    """Reference backward on (M, H) rows -> (dx in x's dtype, dweight in fp32 (fp64 for fp64 inputs))."""
    acc = acc_dtype(x2d.dtype)
    rstd = rstd.to(acc).unsqueeze(-1)
    normed = x2d.to(acc) * rstd
    dyf = dy.to(acc)
    dweight = (dyf * normed.to(x2d.dtype).to(acc)).sum(0)
    g = dyf * weight.to(acc)
    dx = rstd * (g - normed * (g * normed).mean(-1, keepdim=True))
    return dx.to(x2d.dtype), dweight


def _triton_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.dtype in TRITON_DTYPES and weight.dtype in TRITON_DTYPES and x.shape[-1] <= _MAX_TRITON_HIDDEN


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        hidden = x.shape[-1]
        if weight.shape != (hidden,):
            raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match hidden size {hidden}")
        x2d = x.reshape(-1, hidden)
        triton_path = use_triton("rms_norm", x, weight, supported=_triton_ok(x, weight))
        if triton_path:
            x2d, w = x2d.contiguous(), weight.contiguous()
            y, rstd = load_triton().rms_norm_fwd(x2d, w, eps, torch.promote_types(x.dtype, weight.dtype))
        else:
            y, rstd = rms_norm_forward_eager(x2d, weight, eps)
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.triton_path, ctx.x_shape = triton_path, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2d, weight, rstd = ctx.saved_tensors
        dy2d = dy.reshape(x2d.shape)
        if ctx.triton_path:
            dx, dweight = load_triton().rms_norm_bwd(dy2d.contiguous(), x2d, weight, rstd)
        else:
            dx, dweight = rms_norm_backward_eager(dy2d, x2d, weight, rstd)
        return dx.view(ctx.x_shape), dweight.to(weight.dtype), None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The same values in plain differentiable torch ops: what `rms_norm` runs under ``torch.compile``, whose
    inductor fuses them itself (and decides what to save)."""
    xf = x.to(acc_dtype(x.dtype))
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` (any leading shape) with a (H,) ``weight``; see the module docstring."""
    if torch.compiler.is_compiling():
        return rms_norm_reference(x, weight, eps)
    return RMSNormFunction.apply(x, weight, float(eps))


__all__ = ["RMSNormFunction", "rms_norm", "rms_norm_backward_eager", "rms_norm_forward_eager", "rms_norm_reference"]
