"""Causal self-attention kernels over packed sequences.

Every backend takes packed tensors: ``q`` of shape (total_tokens, q_heads, head_dim), ``k`` and ``v``
of shape (total_tokens, kv_heads, head_dim), and ``cu_seqlens`` (int32, documents + 1) holding the
cumulative document boundaries. A token attends only to earlier tokens of its own document. An
unpacked batch (B, S) is the special case ``cu_seqlens = [0, S, 2S, ..., B*S]``.

Backends: ``flash`` (flash-attn's varlen kernel, CUDA only), ``sdpa`` (torch's
scaled_dot_product_attention), ``reference`` (explicit softmax in fp32, slow, for tests).

``sdpa`` never builds a mask: an unpacked batch is one causal call. Packed documents of unequal length, on CUDA
(and other accelerators): gathered into buckets of right-padded documents of similar length (one document per row,
padded lengths 2^k or 1.5 * 2^k), one ``is_causal=True`` call per bucket. A right-padded row is exact under the
causal mask (real queries never see the padding after them), so torch runs its flash or memory-efficient kernel,
which an explicit mask rules out; padding costs at most 1.5x the tokens and 2.25x the attention FLOPs of a
document (about 1.2x on average). On the CPU, where a call costs little and gathers cost much: one causal call per
document on views of q, k, v (``split``: no copy in, one ``cat`` out, and the same in the backward).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

try:  # optional extra
    from flash_attn import flash_attn_varlen_func  # type: ignore
except Exception:  # ImportError, or a broken CUDA build
    flash_attn_varlen_func = None


def flash_attn_available() -> bool:
    return flash_attn_varlen_func is not None


_FLASH_DTYPES = (torch.float16, torch.bfloat16)


BACKENDS = ("auto", "flash", "sdpa", "reference")


def resolve_backend(
    requested: str,
    device: Union[torch.device, str],
    dtype: torch.dtype = torch.bfloat16,
    flash_installed: Optional[bool] = None,
) -> str:
    """The attention backend a run uses: the one rule for the model, the banner and the planner.

    ``auto`` is flash-attn for fp16/bf16 tensors on a CUDA ``device`` when flash-attn is installed, else torch sdpa;
    any other name is kept, after checking that ``flash`` can run. ``flash_installed`` (default: whether this process
    imports flash-attn) lets a planner ask about another machine, e.g. ``resolve_backend(mc.attn_backend, "cuda",
    mc.dtype, flash_installed=True)`` for a GPU run with flash-attn. Raises ValueError for an unknown name and
    RuntimeError when ``flash`` cannot run (not installed, or not a 16-bit dtype).
    """
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; use auto, flash, sdpa or reference")
    installed = flash_attn_available() if flash_installed is None else flash_installed
    if requested == "auto":
        usable = installed and torch.device(device).type == "cuda" and dtype in _FLASH_DTYPES
        return "flash" if usable else "sdpa"
    if requested == "flash":
        if not installed:
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


_MIN_BUCKET = 16


def _bucket_length(length: int) -> int:
    """The padded length of a document: the smallest of 16, 24, 32, 48, 64, 96, ... (2^k, 1.5 * 2^k) >= length."""
    size = _MIN_BUCKET
    while size < length:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3  # 2^k -> 1.5 * 2^k -> 2^(k+1)
    return size


def _document_groups(bounds: Sequence[int]) -> List[Tuple[int, List[Tuple[int, int]]]]:
    """Buckets of documents for the padded causal sdpa calls: ``[(padded length, [(start, length), ...])]``
    in increasing padded length. ``bounds``: cu_seqlens as a list."""
    buckets: Dict[int, List[Tuple[int, int]]] = {}
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            buckets.setdefault(_bucket_length(b - a), []).append((a, b - a))
    return sorted(buckets.items())


class PackedDocs:
    """The document boundaries of one packed batch, with the host-side values the kernels need.

    ``cu_seqlens`` is the int32 tensor on the compute device; ``bounds`` the same boundaries as a Python list
    and ``max_seqlen`` the longest document, when the caller has them on the host (the data loader does:
    ``cu_seqlens_list`` and ``max_seqlen`` of a micro-batch). A value not given is read back from the device on
    first use (one host sync). Build one per micro-batch and pass it to every layer: the sdpa path's document
    grouping (index and mask tensors) is computed once, on first use, and reused by every layer, every
    model chunk and the recomputation of activation checkpointing.
    """

    _Buckets = Tuple[List[Tuple[torch.Tensor, torch.Tensor]], torch.Tensor]

    def __init__(
        self, cu_seqlens: torch.Tensor, bounds: Optional[Sequence[int]] = None, max_seqlen: Optional[int] = None
    ) -> None:
        self.cu_seqlens = cu_seqlens
        self._bounds: Optional[List[int]] = None if bounds is None else list(bounds)
        self._max_seqlen = max_seqlen
        self._uniform: Optional[Tuple[Optional[int]]] = None
        self._buckets: Dict[torch.device, "PackedDocs._Buckets"] = {}
        self._lengths: Optional[List[int]] = None

    @property
    def bounds(self) -> List[int]:
        if self._bounds is None:
            self._bounds = self.cu_seqlens.tolist()  # a host sync: the caller gave no host-side boundaries
        return self._bounds

    @property
    def total(self) -> int:
        """Number of packed tokens."""
        return self.bounds[-1]

    @property
    def max_seqlen(self) -> int:
        if self._max_seqlen is None:
            b = self.bounds
            self._max_seqlen = max((y - x for x, y in zip(b[:-1], b[1:])), default=0)
        return self._max_seqlen

    def uniform_length(self) -> Optional[int]:
        """The common document length when all documents have the same length (an unpacked batch), else None."""
        if self._uniform is None:
            b = self.bounds
            n_docs, total = len(b) - 1, b[-1]
            length = total // n_docs if n_docs > 0 and total % n_docs == 0 else None
            if length is not None and b != list(range(0, total + 1, length)):
                length = None
            self._uniform = (length,)
        return self._uniform[0]

    def lengths(self) -> List[int]:
        """Document lengths in order (from the same host-side plan as the buckets: built once)."""
        if self._lengths is None:
            members = sorted(m for _, group in _document_groups(self.bounds) for m in group)
            self._lengths = [n for _, n in members]
        return self._lengths

    def sdpa_buckets(self, device: torch.device) -> "PackedDocs._Buckets":
        """``([(index, valid)] per bucket, order)`` of `_bucketed_sdpa`, built once per device: ``index`` (docs,
        padded length) token indices (padding points at the document's first token), ``valid`` its real tokens,
        ``order`` the position of every packed token in the concatenation of the buckets' real tokens."""
        if device not in self._buckets:
            buckets, taken = [], []
            for size, members in _document_groups(self.bounds):
                starts = torch.tensor([a for a, _ in members], device=device)
                lengths = torch.tensor([n for _, n in members], device=device)
                offsets = torch.arange(size, device=device)
                valid = offsets[None, :] < lengths[:, None]
                index = starts[:, None] + torch.where(valid, offsets[None, :], torch.zeros_like(offsets)[None, :])
                buckets.append((index, valid))
                taken.append(index[valid])
            order = torch.empty(self.total, dtype=torch.long, device=device)
            gathered = torch.cat(taken)
            order[gathered] = torch.arange(gathered.numel(), device=device)
            self._buckets[device] = (buckets, order)
        return self._buckets[device]


def _per_document_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: PackedDocs) -> torch.Tensor:
    """Packed attention as one causal sdpa call per document, on views (the CPU path)."""
    lengths = docs.lengths()
    outs = [  # (1, heads, length, dim): 4D inputs take torch's fused CPU kernel (3D ones the math path)
        F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (qd, kd, vd)), is_causal=True)
        for qd, kd, vd in zip(q.split(lengths), k.split(lengths), v.split(lengths))
    ]
    return torch.cat([out[0].transpose(0, 1) for out in outs])


def _bucketed_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: PackedDocs) -> torch.Tensor:
    """Packed attention as one causal sdpa call per bucket of right-padded documents of similar length (no mask:
    the flash / memory-efficient kernels apply). Costs about sum(padded length^2) instead of total^2."""
    buckets, order = docs.sdpa_buckets(q.device)
    outs = []
    for index, valid in buckets:
        qb, kb, vb = (t[index].transpose(1, 2) for t in (q, k, v))  # (docs, heads, padded, dim)
        out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True)
        outs.append(out.transpose(1, 2)[valid])
    return outs[0][order] if len(outs) == 1 else torch.cat(outs)[order]


def _as_docs(cu_seqlens: Union[torch.Tensor, PackedDocs], max_seqlen: Optional[int] = None) -> PackedDocs:
    return cu_seqlens if isinstance(cu_seqlens, PackedDocs) else PackedDocs(cu_seqlens, max_seqlen=max_seqlen)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Union[torch.Tensor, PackedDocs]
) -> torch.Tensor:
    docs = _as_docs(cu_seqlens)
    total, heads, _ = q.shape
    k, v = _repeat_kv(k, heads // k.shape[1]), _repeat_kv(v, heads // v.shape[1])
    length = docs.uniform_length()
    if length is not None:  # an ordinary (B, S) batch: use the fused causal kernel
        qb, kb, vb = (t.view(total // length, length, heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True)
        return out.transpose(1, 2).reshape(total, heads, -1)
    if q.device.type == "cpu":
        return _per_document_sdpa(q, k, v, docs)
    return _bucketed_sdpa(q, k, v, docs)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Union[torch.Tensor, PackedDocs]
) -> torch.Tensor:
    if isinstance(cu_seqlens, PackedDocs):
        cu_seqlens = cu_seqlens.cu_seqlens
    total, heads, dim = q.shape
    k, v = _repeat_kv(k, heads // k.shape[1]), _repeat_kv(v, heads // v.shape[1])
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) / math.sqrt(dim)
    scores = scores.masked_fill(~_block_causal_mask(cu_seqlens, total), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: Union[torch.Tensor, PackedDocs],
    max_seqlen: Optional[int],
) -> torch.Tensor:
    docs = _as_docs(cu_seqlens, max_seqlen)
    max_seqlen = docs.max_seqlen if max_seqlen is None else max_seqlen
    cu = docs.cu_seqlens.to(torch.int32)
    return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=True)


def packed_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: Union[torch.Tensor, PackedDocs],
    backend: str = "auto",
    max_seqlen: Optional[int] = None,
) -> torch.Tensor:
    """Causal attention of packed documents; returns (total_tokens, q_heads, head_dim).

    ``cu_seqlens`` is the boundary tensor or a `PackedDocs` carrying it with its host-side values (what the
    model passes its layers: no host sync per layer). With a bare tensor, sdpa reads the boundaries back from
    the device (a host sync per call) and flash does when ``max_seqlen`` is None.
    """
    backend = resolve_backend(backend, q.device, q.dtype)
    if backend == "flash":
        return flash_attention(q, k, v, cu_seqlens, max_seqlen)
    if backend == "sdpa":
        return sdpa_attention(q, k, v, cu_seqlens)
    return reference_attention(q, k, v, cu_seqlens)
