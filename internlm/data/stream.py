"""A data folder (or Megatron indexed dataset) read as one token stream: its documents, in sorted file order."""

from __future__ import annotations

import os
from typing import List

import numpy as np

from .errors import DataError
from .sources import AnyShard, open_shards


class TokenStream:
    """The concatenated tokens of every shard of ``folder`` (memory-mapped).

    Positions are global token indices ``0 .. num_tokens``. A *document end* is the exclusive end
    index of a document, i.e. ``e`` such that token ``e - 1`` is that document's EOS.
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.shards: List[AnyShard] = open_shards(folder)  # shards or Megatron .bin/.idx pairs (sources.py)
        vocab = {s.header["vocab_size"] for s in self.shards}
        if len(vocab) > 1:
            raise DataError(
                folder, f"data folder {folder!r} mixes shards of vocab sizes {sorted(vocab)}; re-tokenize it"
            )
        self.vocab_size = vocab.pop()
        sizes = np.array([s.num_tokens for s in self.shards], dtype=np.int64)
        # shard i covers stream positions [starts[i], starts[i + 1])
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_tokens = int(self.starts[-1])
        self.num_docs = sum(s.num_docs for s in self.shards)

    def __len__(self) -> int:
        return self.num_tokens

    def _shard_range(self, start: int, stop: int) -> range:
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        last = int(np.searchsorted(self.starts, stop, side="left"))
        return range(max(first, 0), min(last, len(self.shards)))

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` as int64 (copies only that slice out of the memory maps)."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"{self.folder}: token range [{start}, {stop}) outside [0, {self.num_tokens})")
        parts = []
        for i in self._shard_range(start, stop):
            base = int(self.starts[i])
            a, b = max(start, base) - base, min(stop, int(self.starts[i + 1])) - base
            if b > a:
                parts.append(np.asarray(self.shards[i].tokens[a:b], dtype=np.int64))
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def doc_ends(self, start: int, stop: int) -> np.ndarray:
        """Document ends ``e`` with ``start < e <= stop`` (int64, increasing).

        Inside a shard a document ends where the next one starts; the last one ends at the shard end.
        """
        ends = []
        for i in self._shard_range(start, stop):
            base, end = int(self.starts[i]), int(self.starts[i + 1])
            offsets = self.shards[i].doc_offsets
            a, b = start - base, stop - base
            # offset 0 (the shard's first start) is the previous shard's end, handled by that shard
            lo = max(int(np.searchsorted(offsets, a, side="right")), 1)
            hi = int(np.searchsorted(offsets, b, side="right"))
            ends.append(np.asarray(offsets[lo:hi], dtype=np.int64) + base)
            if start < end <= stop:
                ends.append(np.array([end], dtype=np.int64))
        return np.concatenate(ends) if ends else np.zeros(0, np.int64)

    def doc_start_at_or_before(self, pos: int) -> int:
        """Start of the document containing token ``pos``."""
        i = int(np.searchsorted(self.starts, pos, side="right")) - 1
        offsets = self.shards[i].doc_offsets
        j = int(np.searchsorted(offsets, pos - int(self.starts[i]), side="right")) - 1
        return int(self.starts[i]) + int(offsets[j])

    def __repr__(self) -> str:
        return f"TokenStream({self.folder!r}, shards={len(self.shards)}, tokens={self.num_tokens})"


def source_key(path: str) -> str:
    """The name under which a source's sampler state is stored: its normalised path as configured."""
    return os.path.normpath(os.fspath(path))
