"""The tokenized shard format: ``NAME.bin`` + ``NAME.bin.meta``.

``NAME.bin`` is the flat array of token ids of every document of the shard, each document followed
by EOS, little-endian ``uint16`` when the vocabulary has fewer than 65536 pieces, else ``int32``.
It is read through ``np.memmap``, so a shard is never loaded into memory.

``NAME.bin.meta`` describes it::

    bytes [0, 8)         magic b"ILMSHARD"
    bytes [8, 16)        H: little-endian uint64, the length of the JSON header
    bytes [16, 16 + H)   JSON header {"version", "dtype", "num_docs", "num_tokens", "vocab_size", "eos_id"},
                         space-padded so that 16 + H is a multiple of 8
    then                 int64 little-endian array (num_docs, 2): [token offset, token length] per document

The meta file is written last (via a temporary file and a rename): a ``.bin`` without ``.bin.meta``
is an interrupted write and is rejected by the reader.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from .errors import DataError, DataFileMissing

MAGIC = b"ILMSHARD"
VERSION = 1
SHARD_SUFFIX = ".bin"
META_SUFFIX = ".bin.meta"


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` for vocabularies below 65536 pieces, else ``int32``."""
    return np.dtype("<u2") if vocab_size < 65536 else np.dtype("<i4")


def write_meta(bin_path: str, header: Dict[str, Any], docs: np.ndarray) -> None:
    """Write ``bin_path + '.meta'`` atomically; ``docs`` is (num_docs, 2) [offset, length]."""
    body = json.dumps(header, sort_keys=True).encode("utf-8")
    body += b" " * (-(16 + len(body)) % 8)
    tmp = bin_path + ".meta.tmp"
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", len(body)) + body)
        f.write(np.ascontiguousarray(docs, dtype="<i8").tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, bin_path + ".meta")


def read_meta_header(meta_path: str) -> tuple:
    """Return (header dict, byte offset of the document table). Raises `DataError` naming ``meta_path`` when the
    file is not a shard meta file, its header is cut short or not JSON, or a header key is missing."""
    with open(meta_path, "rb") as f:
        head = f.read(16)
        if head.startswith(b"\x93NUMPY"):  # InternLM's tools/tokenizer.py output: name the one-command conversion
            folder = os.path.dirname(os.path.abspath(meta_path))
            raise DataError(
                meta_path,
                f"{meta_path}: this is InternLM's tokenized format (JSON-lines .bin with a numpy .bin.meta), not this "
                f"framework's shards; convert it once with python tools/convert_internlm_data.py {folder} "
                f"{folder}_converted and point data.train_folder at the output (docs/internlm_compat.md)",
            )
        if len(head) < 16 or head[:8] != MAGIC:
            raise DataError(meta_path, f"{meta_path}: not a shard meta file (bad magic); re-run tools/tokenizer.py")
        (size,) = struct.unpack("<Q", head[8:])
        body = f.read(min(size, 1 << 20))
    try:
        if len(body) != size:
            raise ValueError(f"the header is cut short ({len(body)} of {size} bytes)")
        header = json.loads(body.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DataError(meta_path, f"{meta_path}: corrupt shard meta file ({exc}); re-run tools/tokenizer.py") from None
    if header.get("version") != VERSION:
        raise DataError(
            meta_path, f"{meta_path}: shard format version {header.get('version')} unsupported (expected {VERSION})"
        )
    missing = [k for k in ("dtype", "num_docs", "num_tokens", "vocab_size") if k not in header]
    if missing:
        raise DataError(meta_path, f"{meta_path}: corrupt shard meta file (no {', '.join(missing)}); re-tokenize")
    return header, 16 + size


class ShardWriter:
    """Append documents to one shard; ``close()`` writes the meta file that marks it complete."""

    def __init__(
        self, bin_path: str, vocab_size: int, eos_id: int, resume_lengths: Optional[np.ndarray] = None
    ) -> None:
        """``resume_lengths``: reopen a shard cut short (an interrupted tokenizer run) keeping exactly these first
        documents: the ``.bin`` is truncated to their tokens and a meta file of a closed shard is removed."""
        self.bin_path = bin_path
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.dtype = token_dtype(vocab_size)
        self.num_tokens = 0
        self._lengths: List[np.ndarray] = []
        if resume_lengths is None:
            self._file = open(bin_path, "wb")
            return
        lengths = np.asarray(resume_lengths, dtype=np.int64)
        for stale in (bin_path + ".meta", bin_path + ".meta.tmp"):
            if os.path.exists(stale):
                os.remove(stale)
        self._file = open(bin_path, "r+b")
        self.num_tokens = int(lengths.sum())
        self._file.truncate(self.num_tokens * self.dtype.itemsize)
        self._file.seek(0, os.SEEK_END)
        self._lengths = [lengths]

    @property
    def lengths(self) -> np.ndarray:
        """Token length of every document written so far."""
        self._lengths = [np.concatenate(self._lengths)] if self._lengths else [np.zeros(0, np.int64)]
        return self._lengths[0]

    def sync(self) -> None:
        """Make the tokens written so far durable (an interrupted run resumes from here)."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as their concatenated tokens (each already ending in EOS) and lengths."""
        if int(lengths.sum()) != tokens.size:
            raise ValueError(f"{self.bin_path}: document lengths sum to {int(lengths.sum())}, tokens {tokens.size}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"{self.bin_path}: token id outside [0, {self.vocab_size})")
        self._file.write(tokens.astype(self.dtype, copy=False).tobytes())
        self._lengths.append(np.asarray(lengths, dtype=np.int64))
        self.num_tokens += int(tokens.size)

    def close(self) -> None:
        self.sync()
        self._file.close()
        lengths = self.lengths
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if lengths.size else lengths
        header = {
            "version": VERSION,
            "dtype": self.dtype.name,
            "num_docs": int(lengths.size),
            "num_tokens": self.num_tokens,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
        }
        write_meta(self.bin_path, header, np.stack([offsets, lengths], axis=1))


class RollingShardWriter:
    """Write documents into ``PREFIX_00000.bin``, ``PREFIX_00001.bin``, ... of ``out_dir``.

    A shard is closed at the first document end at or after ``shard_tokens`` tokens: documents are
    never split, so a shard may hold up to one document more than ``shard_tokens``.
    """

    def __init__(self, out_dir: str, vocab_size: int, eos_id: int, shard_tokens: int, prefix: str = "shard") -> None:
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.out_dir, self.vocab_size, self.eos_id = out_dir, vocab_size, eos_id
        self.shard_tokens, self.prefix = shard_tokens, prefix
        self.paths: List[str] = []
        self.num_docs = 0
        self.num_tokens = 0
        self._current: Optional[ShardWriter] = None

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents (concatenated tokens ending in EOS, and their lengths), rolling shards as needed."""
        ends = np.cumsum(lengths)
        start_doc, start_tok = 0, 0
        while start_doc < lengths.size:
            if self._current is None:
                path = os.path.join(self.out_dir, f"{self.prefix}_{len(self.paths):05d}{SHARD_SUFFIX}")
                self._current = ShardWriter(path, self.vocab_size, self.eos_id)
                self.paths.append(path)
            room = self.shard_tokens - self._current.num_tokens
            # documents [start_doc, stop_doc) go here: up to and including the one crossing the budget
            stop_doc = int(np.searchsorted(ends, start_tok + room, side="left")) + 1
            stop_doc = min(max(stop_doc, start_doc + 1), lengths.size)
            stop_tok = int(ends[stop_doc - 1])
            self._current.add(tokens[start_tok:stop_tok], lengths[start_doc:stop_doc])
            self.num_docs += stop_doc - start_doc
            self.num_tokens += stop_tok - start_tok
            if self._current.num_tokens >= self.shard_tokens:
                self._current.close()
                self._current = None
            start_doc, start_tok = stop_doc, stop_tok

    def snapshot(self) -> Dict[str, Any]:
        """The writer's position as JSON-able data, tokens made durable; `resume` continues from it. The open shard's
        document lengths are returned separately as ``"open_lengths"`` (an array: the caller stores it)."""
        open_lengths = np.zeros(0, np.int64)
        if self._current is not None:
            self._current.sync()
            open_lengths = self._current.lengths.copy()
        return {
            "paths": [os.path.basename(p) for p in self.paths],
            "open": self._current is not None,
            "num_docs": self.num_docs,
            "num_tokens": self.num_tokens,
            "open_lengths": open_lengths,
        }

    def resume(self, state: Mapping[str, Any], open_lengths: np.ndarray) -> None:
        """Continue a `snapshot`: shards written after it are deleted, the open shard is cut back to its documents."""
        names = list(state["paths"])
        for name in sorted(os.listdir(self.out_dir)):
            if name.startswith(self.prefix + "_") and name.endswith(SHARD_SUFFIX) and name not in names:
                for p in (name, name + ".meta", name + ".meta.tmp"):
                    if os.path.exists(os.path.join(self.out_dir, p)):
                        os.remove(os.path.join(self.out_dir, p))
        self.paths = [os.path.join(self.out_dir, n) for n in names]
        self.num_docs, self.num_tokens = int(state["num_docs"]), int(state["num_tokens"])
        if state["open"]:
            self._current = ShardWriter(self.paths[-1], self.vocab_size, self.eos_id, resume_lengths=open_lengths)

    def detach(self) -> None:
        """Close the open shard's file without completing it (an interrupted run: `resume` picks it up)."""
        if self._current is not None:
            self._current._file.close()
            self._current = None

    def abort(self) -> None:
        """Delete every shard this writer created (after a failure), so no partial output remains."""
        if self._current is not None:
            self._current._file.close()
            self._current = None
        for path in self.paths:
            for p in (path, path + ".meta", path + ".meta.tmp"):
                if os.path.exists(p):
                    os.remove(p)
        self.paths = []

    def close(self) -> List[str]:
        if self._current is not None:
            self._current.close()
            self._current = None
        return list(self.paths)


class Shard:
    """Memory-mapped reader of one ``.bin`` shard and its meta."""

    def __init__(self, bin_path: str) -> None:
        self.path = bin_path
        meta_path = bin_path[: -len(SHARD_SUFFIX)] + META_SUFFIX
        if not os.path.isfile(meta_path):
            raise DataFileMissing(
                meta_path,
                f"shard {bin_path!r} has no meta file {meta_path!r} (interrupted write?); re-run tools/tokenizer.py",
            )
        self.header, table_offset = read_meta_header(meta_path)
        try:
            self.num_docs = int(self.header["num_docs"])
            self.num_tokens = int(self.header["num_tokens"])
            self.dtype = np.dtype(self.header["dtype"]).newbyteorder("<")
        except (TypeError, ValueError) as exc:
            raise DataError(meta_path, f"{meta_path}: corrupt shard meta header ({exc}); re-tokenize") from None
        expected = self.num_tokens * self.dtype.itemsize
        if os.path.getsize(bin_path) != expected:
            raise DataError(
                bin_path,
                f"shard {bin_path!r} has {os.path.getsize(bin_path)} bytes but its meta says {expected} "
                f"(truncated or overwritten?); re-tokenize",
            )
        if self.num_tokens == 0:
            raise DataError(bin_path, f"shard {bin_path!r} is empty; re-tokenize")
        table_bytes = os.path.getsize(meta_path) - table_offset
        if self.num_docs < 1 or table_bytes != 16 * self.num_docs:
            raise DataError(
                meta_path,
                f"{meta_path}: the document table holds {max(table_bytes, 0)} bytes, {self.num_docs} documents need "
                f"{16 * self.num_docs} (truncated?); re-tokenize",
            )
        self.tokens = np.memmap(bin_path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        self.docs = np.memmap(meta_path, dtype="<i8", mode="r", offset=table_offset, shape=(self.num_docs, 2))

    @property
    def doc_offsets(self) -> np.ndarray:
        """Start offset of every document (memory-mapped, increasing)."""
        return self.docs[:, 0]

    def document(self, index: int) -> np.ndarray:
        offset, length = (int(v) for v in self.docs[index])
        return np.asarray(self.tokens[offset : offset + length])

    def __len__(self) -> int:
        return self.num_tokens


def list_shards(folder: str) -> List[str]:
    """Sorted ``.bin`` files directly inside ``folder``."""
    if not os.path.isdir(folder):
        raise DataFileMissing(
            folder,
            f"data folder {folder!r} does not exist (nor a Megatron {folder}.bin/.idx pair); tokenize text into it "
            f"with tools/tokenizer.py",
        )
    names = sorted(n for n in os.listdir(folder) if n.endswith(SHARD_SUFFIX))
    if not names:
        raise DataFileMissing(
            folder, f"data folder {folder!r} holds no {SHARD_SUFFIX} shards; run tools/tokenizer.py --output {folder}"
        )
    return [os.path.join(folder, n) for n in names]
