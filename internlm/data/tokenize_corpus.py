"""Raw text -> tokenized shards, streamed and optionally spread over worker processes.

The parent reads the inputs in chunks of about 1 MiB of raw text, at most ``2 * workers`` chunks in
flight; workers parse and tokenize them; the parent writes results in input order, so the output
is identical for any number of workers. This module imports no torch, to keep spawned workers light.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from typing import Deque, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np

from .corpus import RawChunk, iter_raw_chunks, list_input_files, parse_chunk
from .shard import SHARD_SUFFIX, RollingShardWriter, token_dtype
from .tokenizer import Tokenizer

_worker_tokenizer: Optional[Tokenizer] = None


def _init_worker(model_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(model_path)


def _encode_chunk(chunk: RawChunk) -> Tuple[np.ndarray, np.ndarray]:
    """Concatenated ``encode(doc) + [eos]`` of the chunk's documents, and their lengths."""
    tok = _worker_tokenizer
    assert tok is not None, "worker used before _init_worker"
    ids = tok.encode_batch(parse_chunk(chunk))
    lengths = np.array([len(d) + 1 for d in ids], dtype=np.int64)
    flat = np.empty(int(lengths.sum()), dtype=token_dtype(tok.vocab_size))
    pos = 0
    for doc, n in zip(ids, lengths):
        flat[pos : pos + n - 1] = doc
        flat[pos + n - 1] = tok.eos_id
        pos += int(n)
    return flat, lengths


def tokenize_to_shards(
    inputs: Iterable[Union[str, os.PathLike]],
    tokenizer: Union[str, os.PathLike],
    output: Union[str, os.PathLike],
    workers: int = 1,
    shard_tokens: int = 1 << 28,
    prefix: str = "shard",
    progress: bool = True,
    chunk_bytes: int = 1 << 20,
) -> Dict[str, object]:
    """Tokenize ``.txt``/``.jsonl`` files and folders into shards in ``output``.

    Each document is stored as ``encode(text) + [eos]``. ``workers > 1`` uses a spawn-context
    process pool. Returns ``{"shards": [paths], "num_docs": int, "num_tokens": int}``. On any error
    the shards written so far are deleted.
    """
    files = list_input_files(inputs)
    model_path, out_dir = os.fspath(tokenizer), os.fspath(output)
    tok = Tokenizer(model_path)
    os.makedirs(out_dir, exist_ok=True)
    if any(n.endswith(SHARD_SUFFIX) for n in os.listdir(out_dir)):
        raise FileExistsError(f"output folder {out_dir!r} already holds shards; use an empty folder or delete them")
    writer = RollingShardWriter(out_dir, tok.vocab_size, tok.eos_id, shard_tokens, prefix)
    bar = _progress_bar(sum(os.path.getsize(f) for f in files), out_dir) if progress else None
    try:
        for (flat, lengths), nbytes in _encoded(files, model_path, workers, chunk_bytes):
            writer.add(flat, lengths)
            if bar is not None:
                bar.update(nbytes)
                bar.set_postfix(docs=writer.num_docs, tokens=writer.num_tokens, refresh=False)
        paths = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    return {"shards": paths, "num_docs": writer.num_docs, "num_tokens": writer.num_tokens}


def _progress_bar(total_bytes: int, out_dir: str):
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"tokenize -> {out_dir}")


def _encoded(files: List[str], model_path: str, workers: int, chunk_bytes: int):
    """Yield ``((tokens, lengths), raw bytes)`` per chunk, in input order."""
    chunks = iter_raw_chunks(files, chunk_bytes)
    if workers <= 1:
        _init_worker(model_path)
        for chunk in chunks:
            yield _encode_chunk(chunk), chunk.nbytes
        return
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(model_path,)) as pool:
        pending: Deque = deque()
        for chunk in chunks:
            pending.append((pool.apply_async(_encode_chunk, (chunk,)), chunk.nbytes))
            if len(pending) >= 2 * workers:  # bounded: never read far ahead of the writer
                result, nbytes = pending.popleft()
                yield result.get(), nbytes
        while pending:
            result, nbytes = pending.popleft()
            yield result.get(), nbytes
