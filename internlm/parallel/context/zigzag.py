"""Which global token positions each rank of the context group holds.

Context parallelism splits every packed micro-batch of ``total`` tokens across the ``size`` ranks of the context
group for the whole layer stack. Two layouts:

``"ring"`` (zigzag): the sequence is cut into ``2 * size`` equal chunks of ``c = total / (2 * size)`` tokens and
rank ``r`` holds chunk ``r`` then chunk ``2 * size - 1 - r``.

    Why: under the causal mask, the queries of chunk ``j`` see the ``j`` whole chunks before them plus half of
    their own, so their score-matrix area is ``c^2 (j + 1/2)``. A contiguous split (rank r holds chunks 2r, 2r+1)
    gives the last rank ``c^2 (4 size - 2)`` and the first ``2 c^2``: the ring waits on the last rank while the
    first one idles. Zigzag pairs a cheap chunk with an expensive one:

        work(r) = c^2 (r + 1/2) + c^2 (2 size - 1 - r + 1/2) = 2 size c^2      (the same for every rank)

    and, per ring step, each rank computes exactly half a block (module `ring`): for a key block of rank
    ``k < r`` both local query chunks see only the key rank's first chunk; for ``k > r`` only the local second
    chunk sees keys, both of the key rank's chunks. Packed documents only remove work (pairs of tokens of
    different documents), so the figure is an upper bound that every rank reaches for one long document.

``"a2a"`` (contiguous): rank ``r`` holds chunk ``r`` of ``size`` equal chunks. The all-to-all (module `a2a`) makes
every rank compute attention over the whole sequence for ``heads / size`` heads, so the split of the sequence does
not change the balance and contiguous chunks keep the all-to-all a plain concatenation in rank order.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

MODES = ("ring", "a2a")

Ranges = List[Tuple[int, int]]


def check_divisible(mode: str, total: int, size: int) -> None:
    """One-line ValueError when ``total`` tokens cannot be split for ``mode`` over ``size`` ranks."""
    if mode not in MODES:
        raise ValueError(f"parallel.context_mode={mode!r} is unknown; use 'ring' or 'a2a'")
    parts = 2 * size if mode == "ring" else size
    if total % parts:
        raise ValueError(
            f"{total} tokens per micro-batch are not divisible by {parts} (parallel.context={size}, "
            f"context_mode={mode!r}); make micro_bsz * data.seq_len a multiple of {parts}"
        )


def zigzag_ranges(total: int, size: int, rank: int) -> Ranges:
    """``[(start, end)]`` of the two chunks rank ``rank`` holds under ring mode: ``rank`` and ``2 size - 1 - rank``."""
    check_divisible("ring", total, size)
    c = total // (2 * size)
    first, second = rank, 2 * size - 1 - rank
    return [(first * c, (first + 1) * c), (second * c, (second + 1) * c)]


def contiguous_ranges(total: int, size: int, rank: int) -> Ranges:
    """``[(start, end)]`` of the one chunk rank ``rank`` holds under a2a mode: chunk ``rank`` of ``size``."""
    check_divisible("a2a", total, size)
    c = total // size
    return [(rank * c, (rank + 1) * c)]


def shard_ranges(mode: str, total: int, size: int, rank: int) -> Ranges:
    """The global ranges of rank ``rank``'s tokens, in local order, for ``mode`` ("ring" or "a2a")."""
    check_divisible(mode, total, size)
    return zigzag_ranges(total, size, rank) if mode == "ring" else contiguous_ranges(total, size, rank)


def _index(ranges: Sequence[Tuple[int, int]]) -> torch.Tensor:
    return torch.cat([torch.arange(a, b, dtype=torch.long) for a, b in ranges])


def zigzag_index(total: int, size: int, rank: int) -> torch.Tensor:
    """Global positions (LongTensor, ``total / size``) of rank ``rank``'s tokens under ring mode (module docstring)."""
    return _index(zigzag_ranges(total, size, rank))


def contiguous_index(total: int, size: int, rank: int) -> torch.Tensor:
    """Global positions (LongTensor, ``total / size``) of rank ``rank``'s tokens under a2a mode."""
    return _index(contiguous_ranges(total, size, rank))


def shard_index(mode: str, total: int, size: int, rank: int) -> torch.Tensor:
    """Global positions of rank ``rank``'s tokens: `zigzag_index` for "ring", `contiguous_index` for "a2a"."""
    return _index(shard_ranges(mode, total, size, rank))


def restore_order(gathered: torch.Tensor, mode: str, size: int, dim: int = 0) -> torch.Tensor:
    """The global order of a concatenation in rank order of every rank's local tokens along ``dim``.

    ``gathered`` holds rank 0's ``total / size`` tokens, then rank 1's, ...; the result puts token ``i`` of rank
    ``r`` at its global position ``shard_index(mode, total, size, r)[i]``.
    """
    total = gathered.shape[dim]
    order = torch.cat([shard_index(mode, total, size, r) for r in range(size)]).to(gathered.device)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(total, device=order.device)
    return gathered.index_select(dim, inverse)


__all__ = [
    "MODES",
    "check_divisible",
    "zigzag_ranges",
    "contiguous_ranges",
    "shard_ranges",
    "zigzag_index",
    "contiguous_index",
    "shard_index",
    "restore_order",
]
