"""InternLM's tokenized data (its ``tools/tokenizer.py``) and its one-command conversion into our shards.

InternLM writes, per source file, ``NAME.bin``: one JSON line ``{"tokens": [ids...]}`` per document, and
``NAME.bin.meta``: a numpy ``.npy`` array with one row per document, ``(byte offset of its line, token count)``
(some versions add a third column; the count is the last one). Data folders nest (``train/cn/NAME.bin``):
InternLM walks them and samples every document of every file alike.

``convert_internlm_folder(src, dst)`` writes each such file as one shard of this framework's format
(`internlm.data.shard`), all directly inside ``dst`` (the nested path joined by ``__``), documents copied
token for token: InternLM and this framework then train on the same tokens with the same labels (each
document's last token has none). ``min_length`` drops documents shorter than that many tokens, as InternLM's
``data.min_length`` does at load time.

    python tools/convert_internlm_data.py SRC DST [--vocab-size 103168] [--min-length 50]
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterator, List, Tuple

import numpy as np

from .shard import META_SUFFIX, SHARD_SUFFIX, ShardWriter

NPY_MAGIC = b"\x93NUMPY"
CONVERT_COMMAND = "python tools/convert_internlm_data.py"  # named by shard.py when it meets such a .bin.meta


def is_internlm_meta(meta_path: str) -> bool:
    """Whether ``meta_path`` is InternLM's numpy meta file (not our ``ILMSHARD`` one)."""
    with open(meta_path, "rb") as f:
        return f.read(len(NPY_MAGIC)) == NPY_MAGIC


def internlm_files(src: str) -> List[str]:
    """Every ``.bin`` with a ``.bin.meta`` under ``src`` (recursively, sorted)."""
    found = []
    for root, _, names in os.walk(src, followlinks=True):
        for name in names:
            path = os.path.join(root, name)
            if name.endswith(SHARD_SUFFIX) and os.path.isfile(path[: -len(SHARD_SUFFIX)] + META_SUFFIX):
                found.append(path)
    return sorted(found)


def read_documents(bin_path: str) -> Iterator[List[int]]:
    """The token lists of an InternLM ``.bin``, checked against its ``.bin.meta`` (offset and count of every
    document). Raises ValueError naming the file and document on a mismatch or a malformed line."""
    meta = np.load(bin_path[: -len(SHARD_SUFFIX)] + META_SUFFIX)
    if meta.ndim != 2 or meta.shape[1] < 2:
        raise ValueError(f"{bin_path}.meta: expected an (N, 2) array of (offset, length), got shape {meta.shape}")
    with open(bin_path, "rb") as f:
        for index, (offset, length) in enumerate(zip(meta[:, 0].tolist(), meta[:, -1].tolist())):
            f.seek(offset)
            line = f.readline()
            try:
                tokens = json.loads(line)["tokens"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"{bin_path}: document {index} at byte {offset} is not a {{'tokens': [...]}} line ({exc})"
                )
            if len(tokens) != length:
                raise ValueError(f"{bin_path}: document {index} has {len(tokens)} tokens, its meta says {length}")
            yield tokens


def convert_file(
    bin_path: str, out_path: str, vocab_size: int, eos_id: int, min_length: int = 0
) -> Tuple[int, int, int]:
    """Convert one InternLM ``.bin`` into shard ``out_path``; returns ``(documents kept, dropped, tokens)``."""
    writer = ShardWriter(out_path, vocab_size, eos_id)
    kept = dropped = 0
    batch: List[List[int]] = []

    def flush() -> None:
        if batch:
            lengths = np.array([len(t) for t in batch], dtype=np.int64)
            writer.add(
                np.fromiter((t for doc in batch for t in doc), dtype=np.int64, count=int(lengths.sum())), lengths
            )
            batch.clear()

    try:
        for tokens in read_documents(bin_path):
            if len(tokens) < max(min_length, 1):
                dropped += 1
                continue
            batch.append(tokens)
            kept += 1
            if len(batch) >= 4096:
                flush()
        flush()
        if kept == 0:
            raise ValueError(f"{bin_path}: no document of at least {max(min_length, 1)} tokens")
        writer.close()
    except BaseException:  # no partial shard is left behind
        writer._file.close()
        for leftover in (out_path, out_path + ".meta", out_path + ".meta.tmp"):
            if os.path.exists(leftover):
                os.remove(leftover)
        raise
    return kept, dropped, writer.num_tokens


def convert_internlm_folder(
    src: str, dst: str, vocab_size: int = 103168, eos_id: int = 2, min_length: int = 0
) -> Dict[str, int]:
    """Convert every InternLM ``.bin`` under ``src`` into a shard directly inside ``dst``; returns counts
    ``files, documents, dropped, tokens``. Raises ValueError when ``src`` holds none."""
    files = internlm_files(src)
    if not files:
        raise ValueError(f"{src}: no InternLM .bin file with a .bin.meta beside it")
    os.makedirs(dst, exist_ok=True)
    stats = dict(files=0, documents=0, dropped=0, tokens=0)
    for path in files:
        relative = os.path.relpath(path, src)[: -len(SHARD_SUFFIX)].replace(os.sep, "__")
        out = os.path.join(dst, relative + SHARD_SUFFIX)
        kept, dropped, tokens = convert_file(path, out, vocab_size, eos_id, min_length)
        stats["files"] += 1
        stats["documents"] += kept
        stats["dropped"] += dropped
        stats["tokens"] += tokens
    return stats


__all__ = [
    "NPY_MAGIC",
    "CONVERT_COMMAND",
    "is_internlm_meta",
    "internlm_files",
    "read_documents",
    "convert_file",
    "convert_internlm_folder",
]
