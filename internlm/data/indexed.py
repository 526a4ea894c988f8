"""Megatron-LM's indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``, also written by GPT-NeoX and nanotron), read in
place as a shard.

``PREFIX.idx`` (all little-endian)::

    bytes [0, 9)     magic b"MMIDIDX\\x00\\x00"
    [9, 17)          uint64 version, 1
    [17, 18)         uint8 dtype code of the tokens: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64,
                     7 float32, 8 uint16
    [18, 26)         uint64 S, the number of sequences
    [26, 34)         uint64 D, the number of entries of the document index (documents + 1)
    then             int32 lengths[S] (tokens per sequence), int64 pointers[S] (byte offset of each sequence in
                     PREFIX.bin), int64 document_index[D] (document d is sequences [document_index[d],
                     document_index[d+1]), document_index[0] = 0 and document_index[-1] = S), and for a multimodal
                     dataset int8 modes[S] (ignored here)

``PREFIX.bin`` is the sequences' tokens back to back (no header). `IndexedShard` memory-maps both and offers the
interface of `internlm.data.shard.Shard` (``tokens``, ``doc_offsets``, ``num_docs``, ``num_tokens``, ``header``,
``document``), so a `TokenStream` reads it like a folder of shards: every indexed document is one document for
packing (positions and attention restart at its boundaries), its last token's label is ignored. No vocabulary is
recorded in the format (``header["vocab_size"]`` is None): start-up checks the token ids against the model instead.
"""

from __future__ import annotations

import os
import struct
from typing import Any, Dict

import numpy as np

from .errors import DataError, DataFileMissing

IDX_MAGIC = b"MMIDIDX\x00\x00"
IDX_SUFFIX = ".idx"
BIN_SUFFIX = ".bin"
_HEADER = struct.Struct("<9sQBQQ")
DTYPE_CODES = {1: "u1", 2: "i1", 3: "<i2", 4: "<i4", 5: "<i8", 6: "<f8", 7: "<f4", 8: "<u2"}


def is_indexed_prefix(path: str) -> bool:
    """True when ``path + '.idx'`` and ``path + '.bin'`` exist."""
    return os.path.isfile(path + IDX_SUFFIX) and os.path.isfile(path + BIN_SUFFIX)


def read_idx_header(idx_path: str) -> Dict[str, Any]:
    """``{"version", "dtype", "sequences", "doc_index_entries", "table_offset"}``; DataError naming the file when it
    is not a Megatron index or is cut short."""
    with open(idx_path, "rb") as f:
        head = f.read(_HEADER.size)
    if len(head) < _HEADER.size or not head.startswith(IDX_MAGIC):
        raise DataError(idx_path, f"{idx_path}: not a Megatron indexed dataset index (no MMIDIDX header)")
    magic, version, code, sequences, entries = _HEADER.unpack(head)
    if version != 1:
        raise DataError(idx_path, f"{idx_path}: Megatron index version {version} unsupported (expected 1)")
    if code not in DTYPE_CODES:
        raise DataError(idx_path, f"{idx_path}: unknown token dtype code {code} in the Megatron index")
    dtype = np.dtype(DTYPE_CODES[code])
    if dtype.kind == "f":
        raise DataError(
            idx_path,
            f"{idx_path}: tokens are stored as {dtype.name}, not integer ids; this is not a token dataset "
            f"(re-run Megatron's preprocess_data.py on the text)",
        )
    return {
        "version": version,
        "dtype": dtype,
        "sequences": sequences,
        "doc_index_entries": entries,
        "table_offset": _HEADER.size,
    }


class IndexedShard:
    """One ``PREFIX.bin``/``PREFIX.idx`` pair, memory-mapped, read as a shard of documents."""

    def __init__(self, bin_path: str) -> None:
        self.path = bin_path
        prefix = bin_path[: -len(BIN_SUFFIX)]
        idx_path = prefix + IDX_SUFFIX
        if not os.path.isfile(idx_path):
            raise DataFileMissing(idx_path, f"Megatron dataset {bin_path!r} has no index {idx_path!r}")
        head = read_idx_header(idx_path)
        self.dtype = head["dtype"]
        seqs, entries, offset = head["sequences"], head["doc_index_entries"], head["table_offset"]
        table = 4 * seqs + 8 * seqs + 8 * entries
        size = os.path.getsize(idx_path)
        if size not in (offset + table, offset + table + seqs):  # the second: a multimodal index with modes
            raise DataError(
                idx_path, f"{idx_path}: {size} bytes, but its header needs {offset + table} (truncated?); rebuild it"
            )
        lengths = np.memmap(idx_path, dtype="<i4", mode="r", offset=offset, shape=(seqs,)) if seqs else np.zeros(0)
        pointers = np.memmap(idx_path, "<i8", "r", offset + 4 * seqs, (seqs,)) if seqs else np.zeros(0, np.int64)
        doc_index = np.memmap(idx_path, "<i8", "r", offset + 12 * seqs, (entries,)) if entries else np.zeros(0)
        self.num_tokens = int(np.asarray(lengths, dtype=np.int64).sum())
        if self.num_tokens == 0:
            raise DataError(bin_path, f"Megatron dataset {bin_path!r} holds no tokens; rebuild it")
        expected = self.num_tokens * self.dtype.itemsize
        if os.path.getsize(bin_path) != expected:
            raise DataError(
                bin_path,
                f"Megatron dataset {bin_path!r} has {os.path.getsize(bin_path)} bytes but its index says {expected} "
                f"(truncated or another index?); rebuild it",
            )
        starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)[:-1]])
        if not np.array_equal(np.asarray(pointers), starts * self.dtype.itemsize):
            raise DataError(idx_path, f"{idx_path}: sequences are not stored back to back in {bin_path}; rebuild it")
        if entries < 2 or doc_index[0] != 0 or doc_index[-1] != seqs or np.any(np.diff(doc_index) < 0):
            raise DataError(idx_path, f"{idx_path}: corrupt document index (it must rise from 0 to {seqs}); rebuild it")
        # token offset of each document's first token; empty documents (no sequence, or only empty ones) dropped
        bounds = np.append(starts, self.num_tokens)[np.asarray(doc_index)]
        self.doc_offsets = np.unique(bounds[:-1][np.diff(bounds) > 0])
        self.num_docs = int(self.doc_offsets.size)
        self.tokens = np.memmap(bin_path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        self.header = {
            "format": "megatron",
            "dtype": self.dtype.name,
            "num_docs": self.num_docs,
            "num_tokens": self.num_tokens,
            "vocab_size": None,
        }

    def document(self, index: int) -> np.ndarray:
        start = int(self.doc_offsets[index])
        stop = int(self.doc_offsets[index + 1]) if index + 1 < self.num_docs else self.num_tokens
        return np.asarray(self.tokens[start:stop])

    def __len__(self) -> int:
        return self.num_tokens


__all__ = ["IDX_MAGIC", "IndexedShard", "is_indexed_prefix", "read_idx_header"]
