"""Training sources: a data folder opened once per process, with its holdout, identity and fingerprint.

A source is what the sampler draws windows from and the loader reads them from. Both kinds (`TokenSource`
here, `StreamingSource` in `internlm.data.streaming`) answer ``windows_from(epoch, start, seq_len, cap)`` (the
sampler's `Extent`), ``read(epoch, start, stop)``, ``doc_ends(epoch, start, stop)`` and ``release(epoch, start)``.

**Metadata read once**: `open_stream` keeps each opened `TokenStream` (every shard's meta parsed, memory-mapped)
for the life of the process, keyed by the folder and the names, sizes and modification times of its files; the
start-up checks, the trainer's loaders of every phase and the validation batches share it. A folder whose files
changed is opened again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np

from .fingerprint import ORDER_TOKENS, SourceIdentity, identity, make_fingerprint
from .stream import TokenStream

_STREAMS: Dict[str, Tuple[tuple, TokenStream]] = {}


def _signature(path: str) -> tuple:
    """Names, sizes and modification times of the files of a folder (or of a Megatron prefix's .bin/.idx)."""
    try:
        if os.path.isdir(path):
            files = [os.path.join(path, n) for n in sorted(os.listdir(path))]
        else:
            files = [path + ".bin", path + ".idx"]
        return tuple((f, st.st_size, st.st_mtime_ns) for f in files for st in [os.stat(f)])
    except OSError:
        return ()


def open_stream(folder: str) -> TokenStream:
    """The `TokenStream` of ``folder``, opened once per process while its files are unchanged."""
    key = os.path.abspath(folder)
    sig = _signature(folder)
    cached = _STREAMS.get(key)
    if cached is not None and cached[0] == sig and sig:
        return cached[1]
    stream = TokenStream(folder)
    _STREAMS[key] = (sig, stream)
    return stream


def holdout_start(stream: TokenStream, valid_ratio: float) -> int:
    """First held-out token: the start of the document holding token ``n - round(n * valid_ratio)``.

    Snapping to a document start keeps validation documents whole; if that would leave no
    training tokens (one huge document) the raw cut is used.
    """
    if not 0.0 <= valid_ratio < 1.0:
        raise ValueError(f"valid_ratio must be in [0, 1), got {valid_ratio}")
    n = stream.num_tokens
    cut = n - int(round(n * valid_ratio))
    if cut >= n:
        return n
    start = stream.doc_start_at_or_before(cut)
    return start if start > 0 else cut


def stream_fingerprint(stream: TokenStream, train_end: int) -> Dict[str, Any]:
    """Shard names (relative to the folder), ``.bin`` sizes, token and document counts, and the holdout start (shards
    of either kind: this framework's or Megatron's)."""
    files = [(os.path.basename(s.path), os.path.getsize(s.path), s.num_tokens, s.num_docs) for s in stream.shards]
    return make_fingerprint(files, train_end)


@dataclass
class TokenSource:
    """One tokenized data folder: its stream, the training range ``[0, train_end)`` and its identity."""

    key: str
    stream: TokenStream
    train_end: int
    identity: SourceIdentity

    def windows_from(self, epoch: int, start: int, seq_len: int, cap: int) -> int:
        return min(cap, max((self.train_end - 1 - start) // seq_len, 0))

    def read(self, epoch: int, start: int, stop: int) -> np.ndarray:
        return self.stream.read(start, stop)

    def doc_ends(self, epoch: int, start: int, stop: int) -> np.ndarray:
        return self.stream.doc_ends(start, stop)

    def release(self, epoch: int, start: int) -> None:
        """Nothing to free: shards are memory-mapped."""

    def messages(self) -> List[str]:
        return []


def open_token_source(key: str, valid_ratio: float) -> TokenSource:
    stream = open_stream(key)
    train_end = holdout_start(stream, valid_ratio)
    ident = identity(stream.read(0, min(ORDER_TOKENS, stream.num_tokens)), stream_fingerprint(stream, train_end))
    return TokenSource(key, stream, train_end, ident)


def unique_identities(sources: List[Any]) -> Mapping[str, SourceIdentity]:
    """``{key: identity}``; a source whose id another (earlier by path) already has gets ``-2``, ``-3``, ...
    appended (the same data listed under two paths)."""
    out, seen = {}, {}
    for source in sorted(sources, key=lambda s: s.key):
        ident = source.identity
        n = seen.get(ident.sid, 0) + 1
        seen[ident.sid] = n
        if n > 1:
            ident = SourceIdentity(f"{ident.sid}-{n}", ident.order, ident.fingerprint)
        out[source.key] = ident
    return out
