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

# Above this many tokens a dense (T x T) block-diagonal mask gets too large; sdpa then loops over documents.
_MAX_DENSE_MASK_TOKENS = 8192


def flash_attn_available() -> bool:
    return flash_attn_varlen_func is not None


def resolve_backend(requested: str, device: torch.device) -> str:
    """Pick a backend: flash-attn on CUDA when installed, else torch sdpa."""
    if requested == "auto":
        return "flash" if (flash_attn_available() and device.type == "cuda") else "sdpa"
    if requested == "flash" and not flash_attn_available():
        raise RuntimeError("attn_backend='flash' needs the flash-attn package: pip install flash-attn")
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


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    total, heads, _ = q.shape
    k, v = _repeat_kv(k, heads // k.shape[1]), _repeat_kv(v, heads // v.shape[1])
    length = _uniform_length(cu_seqlens, total)
    if length is not None:  # an ordinary (B, S) batch: use the fused causal kernel
        qb, kb, vb = (t.view(total // length, length, heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True)
        return out.transpose(1, 2).reshape(total, heads, -1)
    if total <= _MAX_DENSE_MASK_TOKENS:
        mask = _block_causal_mask(cu_seqlens, total)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
        return out.transpose(0, 1)
    bounds = cu_seqlens.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1))
    return torch.cat(outs, dim=0)


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
    backend = resolve_backend(backend, q.device)
    if backend == "flash":
        return flash_attention(q, k, v, cu_seqlens, max_seqlen)
    if backend == "sdpa":
        return sdpa_attention(q, k, v, cu_seqlens)
    if backend == "reference":
        return reference_attention(q, k, v, cu_seqlens)
    raise ValueError(f"unknown attention backend {backend!r}; use auto, flash, sdpa or reference")
