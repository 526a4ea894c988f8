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

The forward and backward run as the torch custom ops ``internlm::rms_norm_fwd`` / ``internlm::rms_norm_bwd``
(Triton kernel or eager reference inside, chosen by the caller), whose fake implementations give fake tensors
and tracers the output shapes without running either.
"""

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


@torch.library.custom_op("internlm::rms_norm_fwd", mutates_args=())
def rms_norm_fwd_op(
    x2d: torch.Tensor, weight: torch.Tensor, eps: float, kernel: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd) of (M, H) rows: the Triton kernel if ``kernel`` (contiguous inputs), else the eager reference."""
    if kernel:
        return load_triton().rms_norm_fwd(x2d, weight, eps, torch.promote_types(x2d.dtype, weight.dtype))
    return rms_norm_forward_eager(x2d, weight, eps)


@rms_norm_fwd_op.register_fake
def _(x2d: torch.Tensor, weight: torch.Tensor, eps: float, kernel: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    y = x2d.new_empty(x2d.shape, dtype=torch.promote_types(x2d.dtype, weight.dtype))
    return y, x2d.new_empty(x2d.shape[:1], dtype=acc_dtype(x2d.dtype))


@torch.library.custom_op("internlm::rms_norm_bwd", mutates_args=())
def rms_norm_bwd_op(
    dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, kernel: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dx in x's dtype, dweight fp32 (fp64 for fp64 inputs)) of (M, H) rows."""
    if kernel:
        return load_triton().rms_norm_bwd(dy, x2d, weight, rstd)
    return rms_norm_backward_eager(dy, x2d, weight, rstd)


@rms_norm_bwd_op.register_fake
def _(dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, kernel: bool):
    return torch.empty_like(x2d), x2d.new_empty(x2d.shape[1:], dtype=acc_dtype(x2d.dtype))


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
            x2d = x2d.contiguous()
        y, rstd = rms_norm_fwd_op(x2d, weight.contiguous() if triton_path else weight, eps, triton_path)
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.triton_path, ctx.x_shape = triton_path, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2d, weight, rstd = ctx.saved_tensors
        dy2d = dy.reshape(x2d.shape)
        dx, dweight = rms_norm_bwd_op(
            dy2d.contiguous() if ctx.triton_path else dy2d, x2d, weight, rstd, ctx.triton_path
        )
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


__all__ = [
    "RMSNormFunction",
    "rms_norm",
    "rms_norm_backward_eager",
    "rms_norm_bwd_op",
    "rms_norm_forward_eager",
    "rms_norm_fwd_op",
    "rms_norm_reference",
]
