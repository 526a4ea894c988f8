"""Triton kernels for RMSNorm, rotary and SwiGLU, and their launchers (imported lazily by `dispatch.load_triton`).

All arithmetic is fp32; loads convert from the storage dtype and stores round to the output dtype once. The
formulas are stated in `rmsnorm`, `rotary` and `swiglu`; the cross-entropy kernels live in `_triton_ce`.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ._triton_ce import ce_grad_, ce_stats  # noqa: F401  (re-exported: one lazy import loads every kernel)


def persistent_programs(sm_count: int, wanted: int) -> int:
    """Persistent-grid size: two programs per SM (``sm_count`` 2 under the interpreter: a handful)."""
    return max(1, min(wanted, 2 * sm_count))


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


# ------------------------------------------------------------------------------------------------ RMSNorm
@triton.jit
def _rms_fwd(X, W, Y, RSTD, M, N, eps, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
    normed = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)  # the model rounds to x's dtype here
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(Y + offs, (normed * w[None, :]).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rows < M)


@triton.jit
def _rms_bwd(DY, X, W, RSTD, DX, DW, M, N, rows_per_program, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, rows_per_program, BLOCK_M):
        rows = pid * rows_per_program + start + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rows < M, other=0.0)
        normed = x * rstd[:, None]
        dw += tl.sum(dy * normed.to(X.dtype.element_ty).to(tl.float32), axis=0)
        g = dy * w[None, :]
        dot = tl.sum(g * normed, axis=1) / N
        dx = rstd[:, None] * (g - normed * dot[:, None])
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW + pid * N + cols, dw, mask=cols < N)


def rms_launch(n: int) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of both RMSNorm kernels for hidden size ``n``: one row per block of
    next_pow2(n) columns, up to 16 rows while a block holds at most 4096 values; n / 256 warps in [4, 16]."""
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(16, 4096 // block_n))
    return block_m, block_n, min(16, max(4, block_n // 256))


def rms_bwd_rows_per_program(m: int, block_m: int, sm_count: int) -> int:
    """Rows each persistent program of `_rms_bwd` walks through (a multiple of ``block_m``)."""
    blocks = triton.cdiv(m, block_m)
    return triton.cdiv(blocks, persistent_programs(sm_count, blocks)) * block_m


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype):
    """x: (M, N) contiguous -> (y (M, N) of ``out_dtype``, rstd (M,) fp32)."""
    m, n = x.shape
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    block_m, block_n, warps = rms_launch(n)
    _rms_fwd[(triton.cdiv(m, block_m),)](
        x, weight, y, rstd, m, n, eps, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps
    )
    return y, rstd


def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    """-> (dx (M, N) in x's dtype, dweight (N,) fp32 summed over rows)."""
    m, n = x.shape
    block_m, block_n, warps = rms_launch(n)
    rows_per_program = rms_bwd_rows_per_program(m, block_m, _sm_count(x.device))
    programs = triton.cdiv(m, rows_per_program)
    dx = torch.empty_like(x)
    dw = torch.empty((programs, n), dtype=torch.float32, device=x.device)
    _rms_bwd[(programs,)](
        dy, x, weight, rstd, dx, dw, m, n, rows_per_program, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps
    )
    return dx, dw.sum(0)


# ------------------------------------------------------------------------------------------------- rotary
@triton.jit
def _rotary(X, COS, SIN, Y, heads, half, INVERSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < heads) & (d < half)
    c = tl.load(COS + t * half + d, mask=d < half, other=0.0).to(tl.float32)
    s = tl.load(SIN + t * half + d, mask=d < half, other=0.0).to(tl.float32)
    if INVERSE:
        s = -s
    offs = t * heads * 2 * half + h * 2 * half + d
    x1 = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + offs + half, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + offs + half, (x2 * c + x1 * s).to(Y.dtype.element_ty), mask=mask)


def rotary_launch(heads: int, head_dim: int) -> Tuple[int, int, int]:
    """(BLOCK_H, BLOCK_D, num_warps): one program per token holds all its heads x half the head dim."""
    block_h, block_d = triton.next_power_of_2(heads), triton.next_power_of_2(head_dim // 2)
    return block_h, block_d, min(8, max(1, block_h * block_d // 512))


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """x: (T, heads, D) contiguous, cos/sin: (T, D/2) contiguous -> x rotated by +theta (or -theta)."""
    tokens, heads, dim = x.shape
    y = torch.empty_like(x)
    block_h, block_d, warps = rotary_launch(heads, dim)
    _rotary[(tokens,)](
        x, cos, sin, y, heads, dim // 2, INVERSE=inverse, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=warps
    )
    return y


# ------------------------------------------------------------------------------------------------- SwiGLU
@triton.jit
def _swiglu_fwd(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (g * tl.sigmoid(g) * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    tl.store(DG + offs, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dy * g * sig).to(DU.dtype.element_ty), mask=mask)


def swiglu_launch() -> Tuple[int, int]:
    """(BLOCK, num_warps) of both SwiGLU kernels: 1024 elements per program whatever the shape."""
    return 1024, 4


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: contiguous, same shape and dtype -> silu(gate) * up."""
    y = torch.empty_like(gate)
    n = gate.numel()
    block, warps = swiglu_launch()
    _swiglu_fwd[(triton.cdiv(n, block),)](gate, up, y, n, BLOCK=block, num_warps=warps)
    return y


def swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    block, warps = swiglu_launch()
    _swiglu_bwd[(triton.cdiv(n, block),)](dy, gate, up, dgate, dup, n, BLOCK=block, num_warps=warps)
    return dgate, dup


def probe() -> bool:
    """Launch one tiny kernel on CPU tensors: True when the Triton interpreter runs it correctly."""
    g = torch.linspace(-3.0, 3.0, 7)
    u = torch.linspace(1.0, 2.0, 7)
    return bool(torch.allclose(swiglu_fwd(g, u), torch.nn.functional.silu(g) * u, atol=1e-6))
