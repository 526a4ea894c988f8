"""`ContextShard`: what every layer needs about this rank's tokens of one packed micro-batch.

Built once per micro-batch from the GLOBAL document boundaries (`PackedDocs` over all ``total`` tokens of the
sequence) and passed to every layer in place of the `PackedDocs` (as the model passes its ``docs``). Everything is
computed on the host from ``docs.bounds`` (no communication, no device sync, no data-dependent tensor op, so it also
runs on the simulation's fake tensors); each rank computes the same facts about every other rank's block, which
the ring needs to mask and skip the key/value blocks that reach it.

Facts per token (global position ``p``, document ``d(p)`` with ``bounds[d] <= p < bounds[d + 1]``):

    position_ids = p - bounds[d(p)]     (RoPE restarts at each document, as in one process)
    key j is visible to query i  <=>  d(j) == d(i) and j <= i

A pair of query range ``[qa, qb)`` and key range ``[ka, kb)`` has a visible pair iff ``k_lo < k_hi`` with

    k_lo = max(ka, start(qa)),   k_hi = min(kb, qb)          (start / end: the bounds of a token's document)

and only the keys ``[k_lo, k_hi)`` and the queries ``[max(qa, k_lo), min(qb, end(k_hi - 1)))`` take part:
`BlockPair` is that rectangle, in local coordinates.
"""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from internlm.model.attention import PackedDocs

from .zigzag import shard_ranges


class BlockPair(NamedTuple):
    """A rectangle of one (query block, key block) pair with visible pairs, in local coordinates of each block.

    ``full``: every key of ``k`` is visible to every query of ``q`` (one document, keys all before the queries), so
    no mask is needed."""

    q: slice
    k: slice
    full: bool


class Piece(NamedTuple):
    """The visible pairs of one document inside a (query chunk, key chunk) pair, in local coordinates: every key of
    ``k`` visible to every query of ``q`` (``causal`` False: the keys precede the queries) or the causal triangle of
    the same tokens (``causal`` True: ``q`` and ``k`` are the same global positions)."""

    q: slice
    k: slice
    causal: bool


class ContextShard:
    """This rank's tokens of one packed micro-batch under context parallelism (module docstring).

    Attributes: ``mode`` ("ring" / "a2a"), ``size``, ``rank``, ``total`` (global tokens), ``local_tokens``,
    ``global_docs`` (the `PackedDocs` of the whole sequence), ``max_seqlen`` (its longest document: the dynamic
    NTK RoPE length, as in one process), ``ranges`` (per rank, the global ``[(start, end)]`` it holds, in local
    order), ``index`` / ``position_ids`` / ``doc_ids`` (LongTensors of this rank's tokens: global position, position
    inside the document, document id), ``group`` (the context group given to `build`, or None).
    Per peer block: `peer_positions`, `peer_doc_ids`, `block_pairs`.
    """

    def __init__(self, docs: PackedDocs, mode: str, size: int, rank: int, group: Optional[Any] = None) -> None:
        if not 0 <= rank < size:
            raise ValueError(f"context rank {rank} is outside a context group of {size} ranks")
        self.mode, self.size, self.rank, self.group = mode, size, rank, group
        self.global_docs = docs
        self.total = docs.total
        self.local_tokens = self.total // size
        self.max_seqlen = docs.max_seqlen
        self.ranges = [shard_ranges(mode, self.total, size, r) for r in range(size)]
        self.device = docs.cu_seqlens.device
        self._bounds = np.asarray(docs.bounds, dtype=np.int64)
        # host-side facts of every rank's tokens: the ring masks each peer block with them
        self._host: List[Tuple[np.ndarray, np.ndarray]] = []
        for ranges in self.ranges:
            positions = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in ranges])
            self._host.append((positions, self._doc_of(positions)))
        self._tensors: Dict[Tuple[str, int], torch.Tensor] = {}
        self._pairs: Dict[Tuple[int, int], List[BlockPair]] = {}
        self._pieces: Dict[Tuple[int, int], Optional[List[Piece]]] = {}
        self.index = self.peer_positions(rank)
        self.doc_ids = self.peer_doc_ids(rank)
        positions, doc = self._host[rank]
        self.position_ids = self._tensor(positions - self._bounds[doc])

    @classmethod
    def build(
        cls,
        docs: PackedDocs,
        group: Optional[Any],
        mode: str,
        size: Optional[int] = None,
        rank: Optional[int] = None,
    ) -> "ContextShard":
        """The shard of this rank of ``group`` (size and rank read from it); ``group=None`` with ``size`` and ``rank``
        for tests and the simulation (``size=None`` then means one rank)."""
        if group is not None:
            size = dist.get_world_size(group) if size is None else size
            rank = dist.get_rank(group) if rank is None else rank
        return cls(docs, mode, 1 if size is None else size, 0 if rank is None else rank, group)

    # ------------------------------------------------------------------------------------------- host helpers
    def _doc_of(self, positions: np.ndarray) -> np.ndarray:
        # a document index per position: the last boundary <= p (empty documents repeat a boundary: never chosen)
        return np.searchsorted(self._bounds, positions, side="right") - 1

    def _start(self, p: int) -> int:
        return int(self._bounds[self._doc_of(np.asarray([p]))[0]])

    def _end(self, p: int) -> int:
        return int(self._bounds[self._doc_of(np.asarray([p]))[0] + 1])

    def _tensor(self, values: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.long).to(self.device)

    # ------------------------------------------------------------------------------------------- per peer block
    def peer_positions(self, rank: int) -> torch.Tensor:
        """Global positions of rank ``rank``'s tokens (``index`` of that rank), on the device; cached."""
        key = ("pos", rank)
        if key not in self._tensors:
            self._tensors[key] = self._tensor(self._host[rank][0])
        return self._tensors[key]

    def peer_doc_ids(self, rank: int) -> torch.Tensor:
        """Document id of each of rank ``rank``'s tokens, on the device; cached."""
        key = ("doc", rank)
        if key not in self._tensors:
            self._tensors[key] = self._tensor(self._host[rank][1])
        return self._tensors[key]

    def block_pairs(self, q_rank: int, k_rank: int) -> List[BlockPair]:
        """The rectangles of (queries of ``q_rank``, keys of ``k_rank``) that hold visible pairs; an empty list when
        the whole block is masked (the ring skips it). Host-side, cached."""
        key = (q_rank, k_rank)
        if key not in self._pairs:
            pairs, q_off = [], 0
            for qa, qb in self.ranges[q_rank]:
                k_off = 0
                for ka, kb in self.ranges[k_rank]:
                    k_lo, k_hi = max(ka, self._start(qa)), min(kb, qb)
                    if k_lo < k_hi:
                        q_lo, q_hi = max(qa, k_lo), min(qb, self._end(k_hi - 1))
                        full = k_hi - 1 <= q_lo and self._start(q_hi - 1) <= k_lo
                        q_sl = slice(q_off + q_lo - qa, q_off + q_hi - qa)
                        pairs.append(BlockPair(q_sl, slice(k_off + k_lo - ka, k_off + k_hi - ka), full))
                    k_off += kb - ka
                q_off += qb - qa
            self._pairs[key] = pairs
        return self._pairs[key]

    def pieces(self, q_rank: int, k_rank: int) -> Optional[List[Piece]]:
        """The visible pairs of (queries of ``q_rank``, keys of ``k_rank``) as one `Piece` per document and chunk
        pair, each computable by a fused kernel without a mask (no piece when nothing is visible); None when some
        chunk pair overlaps only partly (never with the zigzag or contiguous layouts: their chunks are equal or
        disjoint), then the caller uses `block_pairs`. Every query row lies in at most one piece. Cached."""
        key = (q_rank, k_rank)
        if key not in self._pieces:
            pieces: Optional[List[Piece]] = []
            q_off = 0
            for qa, qb in self.ranges[q_rank]:
                k_off = 0
                for ka, kb in self.ranges[k_rank]:
                    if (ka, kb) != (qa, qb) and not kb <= qa:
                        if ka < qb:  # neither the same chunk nor wholly before or after the queries
                            pieces = None
                            break
                    elif pieces is not None:
                        first, last = self._doc_of(np.asarray([max(qa, ka), min(qb, kb) - 1]))
                        causal = (ka, kb) == (qa, qb)
                        for d in range(int(first), int(last) + 1):
                            s, e = int(self._bounds[d]), int(self._bounds[d + 1])
                            q_lo, q_hi, k_lo, k_hi = max(qa, s), min(qb, e), max(ka, s), min(kb, e)
                            if q_lo < q_hi and k_lo < k_hi:
                                q_sl = slice(q_off + q_lo - qa, q_off + q_hi - qa)
                                pieces.append(Piece(q_sl, slice(k_off + k_lo - ka, k_off + k_hi - ka), causal))
                    k_off += kb - ka
                if pieces is None:
                    break
                q_off += qb - qa
            self._pieces[key] = pieces
        return self._pieces[key]

    def visible(self, q_rank: int, k_rank: int, pair: BlockPair) -> torch.Tensor:
        """Boolean (queries, keys) mask of ``pair``: same document and key position <= query position."""
        q_doc, k_doc = self.peer_doc_ids(q_rank)[pair.q], self.peer_doc_ids(k_rank)[pair.k]
        q_pos, k_pos = self.peer_positions(q_rank)[pair.q], self.peer_positions(k_rank)[pair.k]
        return (q_doc[:, None] == k_doc[None, :]) & (k_pos[None, :] <= q_pos[:, None])

    # ------------------------------------------------------------------------------------------- tensors
    def take(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's tokens of a tensor over the whole sequence along ``dim`` (no communication)."""
        if self.size == 1:
            return x
        return x.index_select(dim, self.index.to(x.device))

    def __repr__(self) -> str:
        return (
            f"ContextShard(mode={self.mode!r}, size={self.size}, rank={self.rank}, total={self.total}, "
            f"ranges={self.ranges[self.rank]})"
        )


__all__ = ["BlockPair", "ContextShard", "Piece"]
