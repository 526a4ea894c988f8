"""Which files a source (an entry of ``data.train_folder`` / ``data.valid_folder``) is made of, and the token-id
check of its files against the model.

Token ids are checked as they are read (`check_window_ids`, called by the loader on every sequence it packs: a
min and a max over ``seq_len + 1`` tokens), not by a scan at start-up: a scan reads the whole corpus on every rank
at every start (terabytes for a 104B run), while reading costs only what training consumes. Only a window that
fails is followed by a scan of its source's shards (`token_id_problem`), to name the shard.

A source is one of:

* a folder of this framework's shards (``NAME.bin`` + ``NAME.bin.meta``, `internlm.data.shard`);
* a folder of Megatron indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``, `internlm.data.indexed`);
* the prefix of one Megatron indexed dataset (``/data/corpus_text_document`` for ``corpus_text_document.bin/.idx``).

A folder's files are read in sorted file-name order; a folder holding both kinds is refused (make two sources).
"""

from __future__ import annotations

import os
from typing import Dict, Iterable, List, Optional, Tuple, Union

import numpy as np

from .errors import DataError
from .indexed import IDX_SUFFIX, IndexedShard, is_indexed_prefix
from .shard import META_SUFFIX, SHARD_SUFFIX, Shard, list_shards

AnyShard = Union[Shard, IndexedShard]
SCAN_TOKENS = 1 << 24  # tokens per chunk of the id range scan (32-64 MiB of a memory map at a time)


def open_shards(path: str) -> List[AnyShard]:
    """The shards of a source, opened (meta and index files read and checked), in reading order."""
    if not os.path.isdir(path) and is_indexed_prefix(path):
        return [IndexedShard(path + SHARD_SUFFIX)]
    bins = list_shards(path)  # names the folder when it is missing or holds no .bin
    indexed = [p for p in bins if os.path.isfile(p[: -len(SHARD_SUFFIX)] + IDX_SUFFIX)]
    if not indexed:
        return [Shard(p) for p in bins]
    native = [p for p in bins if os.path.isfile(p[: -len(SHARD_SUFFIX)] + META_SUFFIX)]
    if native:
        raise DataError(
            path,
            f"data folder {path!r} holds both Megatron .bin/.idx pairs ({os.path.basename(indexed[0])}) and shards "
            f"with .bin.meta ({os.path.basename(native[0])}); put them in two folders and list both as sources",
        )
    return [IndexedShard(p) for p in bins]


_RANGES: Dict[Tuple[str, int, int], Tuple[int, int]] = {}  # (path, size, mtime_ns) -> range: one scan per process


def token_id_range(shard: AnyShard) -> Tuple[int, int]:
    """(smallest, largest) token id of a shard, scanned through its memory map in chunks of ``SCAN_TOKENS``
    (remembered for the process, so the phases of a run that share data scan it once)."""
    st = os.stat(shard.path)
    key = (os.path.abspath(shard.path), st.st_size, st.st_mtime_ns)
    if key not in _RANGES:
        _RANGES[key] = _scan(shard)
    return _RANGES[key]


class TokenIdError(DataError):
    """A token id outside ``[0, model.vocab_size)``: the message is ``model.vocab_size: `` + ``problem`` (which
    names the shard), as the run prints it when a step reads the window."""

    def __init__(self, path: str, problem: str) -> None:
        self.problem = problem
        super().__init__(path, f"model.vocab_size: {problem}")


def check_window_ids(tokens: np.ndarray, source_key: str, shards: Iterable[AnyShard], vocab_size: int) -> None:
    """Raise `TokenIdError` naming the shard when a window of tokens just read from source ``source_key`` holds an
    id outside ``[0, vocab_size)``: an id past the embedding would fail in the model as an IndexError naming no
    file."""
    if tokens.size == 0 or (int(tokens.min()) >= 0 and int(tokens.max()) < vocab_size):
        return
    problem = token_id_problem(shards, vocab_size)
    raise TokenIdError(source_key, problem or f"source {source_key} holds token ids outside [0, {vocab_size})")


def _scan(shard: AnyShard) -> Tuple[int, int]:
    lo, hi = None, None
    for start in range(0, shard.num_tokens, SCAN_TOKENS):
        chunk = np.asarray(shard.tokens[start : start + SCAN_TOKENS])
        cmin, cmax = int(chunk.min()), int(chunk.max())
        lo = cmin if lo is None else min(lo, cmin)
        hi = cmax if hi is None else max(hi, cmax)
    return (lo or 0), (hi or 0)


def token_id_problem(shards: Iterable[AnyShard], vocab_size: int) -> Optional[str]:
    """One line naming the first shard whose token ids fall outside ``[0, vocab_size)`` (its largest or smallest
    id and the model's vocab_size), or None when every id fits the embedding."""
    for shard in shards:
        if np.dtype(shard.dtype).kind == "u" and np.iinfo(shard.dtype).max < vocab_size:
            continue  # an unsigned type whose every value fits: nothing to scan
        lo, hi = token_id_range(shard)
        if hi >= vocab_size:
            return (
                f"shard {shard.path} holds token id {hi} (stored as {np.dtype(shard.dtype).name}), but "
                f"model.vocab_size={vocab_size}: ids must be < vocab_size; tokenize with the model's tokenizer or "
                f"raise model.vocab_size to at least {hi + 1}"
            )
        if lo < 0:
            return f"shard {shard.path} holds the negative token id {lo}; it is not token data for this model"
    return None


__all__ = ["TokenIdError", "check_window_ids", "open_shards", "token_id_problem", "token_id_range"]
