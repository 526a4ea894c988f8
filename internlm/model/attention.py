"""Causal self-attention kernels over packed sequences.

Every backend takes packed tensors: ``q`` of shape (total_tokens, q_heads, head_dim), ``k`` and ``v``
of shape (total_tokens, kv_heads, head_dim), and ``cu_seqlens`` (int32, documents + 1) holding the
cumulative document boundaries. A token attends only to earlier tokens of its own document. An
unpacked batch (B, S) is the special case ``cu_seqlens = [0, S, 2S, ..., B*S]``.

Backends: ``flash`` (flash-attn's varlen kernel, CUDA only), ``sdpa`` (torch's
scaled_dot_product_attention), ``reference`` (explicit softmax in fp32, slow, for tests).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

try:  # optional extra
    from flash_attn import flash_attn_varlen_func  # type: ignore
except Exception:  # ImportError, or a broken CUDA build
    flash_attn_varlen_func = None


def flash_attn_available() -> bool:
    return flash_attn_varlen_func is not None


_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str:
    """Pick a backend: flash-attn for fp16/bf16 CUDA tensors when it is installed, else torch sdpa."""
    if requested == "auto":
        usable = flash_attn_available() and device.type == "cuda" and dtype in _FLASH_DTYPES
        return "flash" if usable else "sdpa"
    if requested == "flash":
        if not flash_attn_available():
            raise RuntimeError("attn_backend='flash' needs the flash-attn package: pip install flash-attn")
        if dtype not in _FLASH_DTYPES:
            raise RuntimeError(
                f"attn_backend='flash' runs fp16/bf16 only, got {dtype}; use model.dtype="
                f"'torch.bfloat16' or attn_backend='sdpa'"
            )
    return requested


def document_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Index of the document each token belongs to, shape (total,)."""
    positions = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position of each token inside its document (restarts at 0 for every document)."""
    doc = document_ids(cu_seqlens, total)
    return torch.arange(total, device=cu_seqlens.device) - cu_seqlens[doc].long()


def _block_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    doc = document_ids(cu_seqlens, total)
    same_doc = doc[:, None] == doc[None, :]
    causal = torch.ones(total, total, dtype=torch.bool, device=cu_seqlens.device).tril()
    return same_doc & causal


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(T, kv_heads, D) -> (T, kv_heads * n_rep, D), each kv head serving n_rep query heads."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def _uniform_length(cu_seqlens: torch.Tensor, total: int) -> Optional[int]:
    """The common document length when all documents have the same length (an unpacked batch)."""
    n_docs = cu_seqlens.numel() - 1
    if n_docs <= 0 or total % n_docs:
        return None
    length = total // n_docs
    expected = torch.arange(0, total + 1, length, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return length if torch.equal(cu_seqlens, expected) else None


def _document_groups(cu_seqlens: torch.Tensor, total: int, min_group: int = 256):
    """Cut the packed tokens into contiguous groups of whole documents, each at most `size` tokens long,
    where size = max(longest document, min_group). Returns (size, [(start, end), ...])."""
    bounds = cu_seqlens.tolist()
    size = max(max(b - a for a, b in zip(bounds[:-1], bounds[1:])), min(total, min_group))
    groups, start, prev = [], 0, 0
    for end in bounds[1:]:
        if end - start > size:
            groups.append((start, prev))
            start = prev
        prev = end
    groups.append((start, total))
    return size, groups


def _grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Packed attention as one batched sdpa call over groups of whole documents.

    A dense (T x T) mask would cost T^2 even though attention is block-diagonal; grouping documents into
    windows of `size` tokens (padded) costs about T * size instead, in a single kernel call.
    """
    total = q.shape[0]
    size, groups = _document_groups(cu_seqlens, total)
    device = q.device
    starts = torch.tensor([a for a, _ in groups], device=device)
    lengths = torch.tensor([b - a for a, b in groups], device=device)
    offsets = torch.arange(size, device=device)
    valid = offsets[None, :] < lengths[:, None]  # (G, size)
    index = torch.where(valid, starts[:, None] + offsets[None, :], torch.zeros_like(valid, dtype=torch.long))
    doc = document_ids(cu_seqlens, total)[index]
    causal = torch.ones(size, size, dtype=torch.bool, device=device).tril()
    mask = (doc[:, :, None] == doc[:, None, :]) & causal & valid[:, None, :]
    mask |= torch.eye(size, dtype=torch.bool, device=device) & ~valid[:, :, None]  # padding rows: no NaN
    qg, kg, vg = (t[index].transpose(1, 2) for t in (q, k, v))  # (G, heads, size, dim)
    out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask[:, None])
    return out.transpose(1, 2)[valid]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    total, heads, _ = q.shape
    k, v = _repeat_kv(k, heads // k.shape[1]), _repeat_kv(v, heads // v.shape[1])
    length = _uniform_length(cu_seqlens, total)
    if length is not None:  # an ordinary (B, S) batch: use the fused causal kernel
        qb, kb, vb = (t.view(total // length, length, heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True)
        return out.transpose(1, 2).reshape(total, heads, -1)
    return _grouped_sdpa(q, k, v, cu_seqlens)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    total, heads, dim = q.shape
    k, v = _repeat_kv(k, heads // k.shape[1]), _repeat_kv(v, heads // v.shape[1])
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) / math.sqrt(dim)
    scores = scores.masked_fill(~_block_causal_mask(cu_seqlens, total), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: Optional[int]
) -> torch.Tensor:
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    cu = cu_seqlens.to(torch.int32)
    return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=True)


def packed_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    backend: str = "auto",
    max_seqlen: Optional[int] = None,
) -> torch.Tensor:
    """Causal attention of packed documents; returns (total_tokens, q_heads, head_dim)."""
    backend = resolve_backend(backend, q.device, q.dtype)
    if backend == "flash":
        return flash_attention(q, k, v, cu_seqlens, max_seqlen)
    if backend == "sdpa":
        return sdpa_attention(q, k, v, cu_seqlens)
    if backend == "reference":
        return reference_attention(q, k, v, cu_seqlens)
    raise ValueError(f"unknown attention backend {backend!r}; use auto, flash, sdpa or reference")
