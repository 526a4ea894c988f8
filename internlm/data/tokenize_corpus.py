"""Raw documents -> tokenized shards, streamed, optionally spread over worker processes, resumable.

The parent reads the inputs (`internlm.data.readers`) in raw batches of about 1 MiB, at most ``2 * workers`` batches
in flight; workers parse, tokenize and (with ``dedup="exact"``) hash them; the parent drops duplicates and writes
results in input order, so the output is byte-identical for any number of workers.

**Resume.** At input-file boundaries (at most every ``save_interval`` seconds) the parent makes the written tokens
durable and records in ``OUTPUT/.tokenize-state.json`` how many input files are complete, the writer's position and
the counters (the open shard's document lengths and the dedup digests go to two side files). A rerun of the same
command continues after the last recorded file, cutting the open shard back to it; one with other settings, or
whose completed input files changed, is refused. This module imports no torch, to keep spawned workers light.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import deque
from typing import Any, Deque, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np

from .corpus import no_documents_message
from .readers import InputFile, RawBatch, iter_raw_batches, list_files, parse_batch
from .shard import SHARD_SUFFIX, RollingShardWriter, token_dtype
from .tokenizer import Tokenizer

STATE_FILE = ".tokenize-state.json"
LENGTHS_FILE = ".tokenize-open-lengths.bin"  # int64 lengths of the open shard's documents
DIGESTS_FILE = ".tokenize-digests.bin"  # 16-byte blake2b digests of the documents kept (dedup="exact")
DEDUP_MODES = ("none", "exact")

_worker: Dict[str, Any] = {}


def _init_worker(model_path: str, text_key: str, skip_bad: bool, dedup: bool, in_pool: bool = False) -> None:
    if in_pool:  # Ctrl-C is the parent's to handle (it records progress and closes the pool), not every worker's
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker.update(tok=Tokenizer(model_path), text_key=text_key, skip_bad=skip_bad, dedup=dedup)


def _encode_batch(batch: RawBatch) -> Tuple[np.ndarray, np.ndarray, List[bytes], int]:
    """(concatenated ``encode(doc) + [eos]``, their lengths, the documents' digests (dedup) or [], bad records)."""
    tok: Tokenizer = _worker["tok"]
    docs, bad = parse_batch(batch, _worker["text_key"], _worker["skip_bad"])
    texts = [d.text for d in docs]
    digests = [hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest() for t in texts] if _worker["dedup"] else []
    ids = tok.encode_batch(texts)
    lengths = np.array([len(d) + 1 for d in ids], dtype=np.int64)
    flat = np.empty(int(lengths.sum()), dtype=token_dtype(tok.vocab_size))
    pos = 0
    for doc, n in zip(ids, lengths):
        flat[pos : pos + n - 1] = doc
        flat[pos + n - 1] = tok.eos_id
        pos += int(n)
    return flat, lengths, digests, bad


def _keep(flat: np.ndarray, lengths: np.ndarray, mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The documents whose ``mask`` is true."""
    if mask.all():
        return flat, lengths
    return flat[np.repeat(mask, lengths)], lengths[mask]


class Progress:
    """One status line: files, documents, tokens, rate and ETA (by bytes of input read); ``\\r``-updated on a
    terminal, else a new line every ``every`` seconds. ``final()`` prints the last state on its own line."""

    def __init__(self, total_files: int, total_bytes: int, stream=None, every: float = 10.0) -> None:
        self.total_files, self.total_bytes = total_files, max(total_bytes, 1)
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = 0.5 if self.tty else every
        self.start = self.last = time.monotonic()

    def line(self, files: int, docs: int, tokens: int, done_bytes: int) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = done_bytes / elapsed
        eta = (self.total_bytes - done_bytes) / rate if rate > 0 else float("inf")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "?"
        return (
            f"tokenize: {files}/{self.total_files} files, {docs:,} docs, {tokens:,} tokens, "
            f"{tokens / elapsed:,.0f} tokens/s, {rate / 1e6:.2f} MB/s, "
            f"{100 * done_bytes / self.total_bytes:.0f}% ETA {eta_text}"
        )

    def update(self, *counts: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.stream.write(("\r" if self.tty else "") + self.line(*counts) + ("" if self.tty else "\n"))
            self.stream.flush()

    def final(self, *counts: int) -> None:
        self.stream.write(("\r" if self.tty else "") + self.line(*counts) + "\n")
        self.stream.flush()


def _settings(model_path: str, text_key: str, shard_tokens: int, prefix: str, dedup: str, skip_bad: bool) -> dict:
    with open(model_path, "rb") as f:
        model_sha = hashlib.sha256(f.read()).hexdigest()
    return {
        "tokenizer_sha256": model_sha,
        "text_key": text_key,
        "shard_tokens": shard_tokens,
        "prefix": prefix,
        "dedup": dedup,
        "skip_bad": skip_bad,
    }


def _write_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _Run:
    """The parent's bookkeeping: writer, counters, dedup set and the resume record of ``out_dir``."""

    def __init__(self, out_dir: str, files: List[InputFile], settings: dict, writer: RollingShardWriter) -> None:
        self.out_dir, self.files, self.settings, self.writer = out_dir, files, settings, writer
        self.done_files = 0
        self.duplicates = self.bad = 0
        self.digests: set = set()
        self._new_digests: List[bytes] = []
        self._saved_digests = 0

    def path(self, name: str) -> str:
        return os.path.join(self.out_dir, name)

    def load(self) -> bool:
        """Resume from the record in ``out_dir``; False when there is none. Raises ValueError when it does not fit."""
        if not os.path.isfile(self.path(STATE_FILE)):
            return False
        with open(self.path(STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
        where = f"{self.out_dir} holds an unfinished tokenizer run"
        if state["settings"] != self.settings:
            changed = sorted(k for k in self.settings if state["settings"].get(k) != self.settings[k])
            raise ValueError(
                f"{where} with other settings ({', '.join(changed)}); rerun it with the same tokenizer and flags "
                f"or empty the folder"
            )
        done = [(f["rel"], f["size"]) for f in state["files"]]
        now = [(f.rel, f.size) for f in self.files[: len(done)]]
        if now != done:
            diff = next(a for a, b in zip(done + [("?", 0)], now + [("(missing)", 0)]) if a != b)
            raise ValueError(
                f"{where} whose completed input {diff[0]} changed or moved; rerun with the same inputs or empty "
                f"the folder"
            )
        lengths = np.fromfile(self.path(LENGTHS_FILE), dtype="<i8") if state["writer"]["open"] else np.zeros(0)
        self.writer.resume(state["writer"], lengths[: int(state["open_docs"])])
        self.done_files = len(done)
        self.duplicates, self.bad = int(state["duplicates"]), int(state["bad"])
        if self.settings["dedup"] == "exact":
            raw = np.fromfile(self.path(DIGESTS_FILE), dtype=np.uint8)[: 16 * int(state["digests"])].tobytes()
            self.digests = {raw[i : i + 16] for i in range(0, len(raw), 16)}
            self._saved_digests = len(self.digests)
        return True

    def save(self) -> None:
        """Record the present position (called at an input-file boundary)."""
        snap = self.writer.snapshot()
        lengths = snap.pop("open_lengths")
        _write_atomic(self.path(LENGTHS_FILE), lengths.astype("<i8").tobytes())
        if self._new_digests:
            mode = "r+b" if os.path.exists(self.path(DIGESTS_FILE)) else "wb"
            with open(self.path(DIGESTS_FILE), mode) as f:
                f.truncate(16 * self._saved_digests)  # drop what a run interrupted after its last record appended
                f.seek(0, os.SEEK_END)
                f.write(b"".join(self._new_digests))
                f.flush()
                os.fsync(f.fileno())
            self._saved_digests += len(self._new_digests)
            self._new_digests = []
        state = {
            "settings": self.settings,
            "files": [{"rel": f.rel, "size": f.size} for f in self.files[: self.done_files]],
            "writer": snap,
            "open_docs": int(lengths.size),
            "duplicates": self.duplicates,
            "bad": self.bad,
            "digests": self._saved_digests,
        }
        _write_atomic(self.path(STATE_FILE), json.dumps(state).encode("utf-8"))

    def add(self, flat: np.ndarray, lengths: np.ndarray, digests: List[bytes], bad: int) -> None:
        self.bad += bad
        if digests:
            mask = np.ones(lengths.size, dtype=bool)
            for i, d in enumerate(digests):
                if d in self.digests:
                    mask[i] = False
                else:
                    self.digests.add(d)
                    self._new_digests.append(d)
            self.duplicates += int((~mask).sum())
            flat, lengths = _keep(flat, lengths, mask)
        if lengths.size:
            self.writer.add(flat, lengths)

    def clear_record(self) -> None:
        for name in (STATE_FILE, LENGTHS_FILE, DIGESTS_FILE):
            for p in (self.path(name), self.path(name) + ".tmp"):
                if os.path.exists(p):
                    os.remove(p)


def tokenize_to_shards(
    inputs: Iterable[Union[str, os.PathLike]],
    tokenizer: Union[str, os.PathLike],
    output: Union[str, os.PathLike],
    workers: int = 1,
    shard_tokens: int = 1 << 28,
    prefix: str = "shard",
    progress: bool = True,
    chunk_bytes: int = 1 << 20,
    text_key: str = "text",
    dedup: str = "none",
    skip_bad: bool = False,
    save_interval: float = 1.0,
) -> Dict[str, Any]:
    """Tokenize files and folders (`internlm.data.readers` formats) into shards in ``output``.

    Each document is stored as ``encode(text) + [eos]``. ``workers > 1`` uses a spawn-context process pool.
    Returns ``{"shards", "num_docs", "num_tokens", "duplicates", "bad_records", "files", "resumed_files"}``.
    Raises ValueError (`BadRecord` for a malformed record unless ``skip_bad``, or when no document was found)
    and FileExistsError (the folder holds shards of a finished run). After an error the shards of the input files
    recorded as complete stay, with the resume record; a run that completed no file leaves nothing.
    """
    if dedup not in DEDUP_MODES:
        raise ValueError(f"dedup must be one of {DEDUP_MODES}, got {dedup!r}")
    inputs = [os.fspath(i) for i in inputs]
    files = list_files(inputs)
    if not files:
        raise ValueError(no_documents_message(inputs))
    model_path, out_dir = os.fspath(tokenizer), os.fspath(output)
    tok = Tokenizer(model_path)
    os.makedirs(out_dir, exist_ok=True)
    writer = RollingShardWriter(out_dir, tok.vocab_size, tok.eos_id, shard_tokens, prefix)
    run = _Run(out_dir, files, _settings(model_path, text_key, shard_tokens, prefix, dedup, skip_bad), writer)
    resumed = run.load()
    if not resumed and any(n.endswith(SHARD_SUFFIX) for n in os.listdir(out_dir)):
        raise FileExistsError(f"output folder {out_dir!r} already holds shards; use an empty folder or delete them")
    if not resumed:
        run.save()  # from now on a rerun continues this run (or restarts it cleanly when no file completed)
    start_files = run.done_files
    bar = Progress(len(files), sum(f.size for f in files[start_files:])) if progress else None
    done_bytes, last_save = 0, time.monotonic()
    try:
        stream = _encoded(files[start_files:], model_path, workers, chunk_bytes, text_key, skip_bad, dedup == "exact")
        for result, nbytes in stream:
            if result is None:  # the end of an input file
                run.done_files += 1
                if time.monotonic() - last_save >= save_interval:
                    run.save()
                    last_save = time.monotonic()
            else:
                run.add(*result)
            done_bytes += nbytes
            if bar is not None:
                bar.update(run.done_files - start_files, writer.num_docs, writer.num_tokens, done_bytes)
        if writer.num_docs == 0:
            raise ValueError(no_documents_message(inputs))
        paths = writer.close()
    except BaseException:
        if run.done_files == 0 or writer.num_docs == 0 or not os.path.isfile(run.path(STATE_FILE)):
            writer.abort()  # nothing recorded as complete: leave nothing
            run.clear_record()
        else:
            writer.detach()
        raise
    run.clear_record()
    if bar is not None:
        bar.final(run.done_files - start_files, writer.num_docs, writer.num_tokens, done_bytes)
    return {
        "shards": paths,
        "num_docs": writer.num_docs,
        "num_tokens": writer.num_tokens,
        "duplicates": run.duplicates,
        "bad_records": run.bad,
        "files": len(files),
        "resumed_files": start_files,
    }


def _batches(files: List[InputFile], text_key: str, chunk_bytes: int) -> Iterator[Optional[RawBatch]]:
    """Every file's raw batches, then None at its end."""
    for f in files:
        yield from iter_raw_batches(f, text_key, chunk_bytes)
        yield None


def _encoded(
    files: List[InputFile],
    model_path: str,
    workers: int,
    chunk_bytes: int,
    text_key: str,
    skip_bad: bool,
    dedup: bool,
) -> Iterator[Tuple[Optional[tuple], int]]:
    """Yield ``(encoded batch, raw bytes)`` per batch in input order, and ``(None, 0)`` at each file's end."""
    args = (model_path, text_key, skip_bad, dedup)
    if workers <= 1:
        _init_worker(*args)
        for batch in _batches(files, text_key, chunk_bytes):
            yield (None, 0) if batch is None else (_encode_batch(batch), batch.nbytes)
        return
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(*args, True)) as pool:
        pending: Deque = deque()
        for batch in _batches(files, text_key, chunk_bytes):
            pending.append((None, 0) if batch is None else (pool.apply_async(_encode_batch, (batch,)), batch.nbytes))
            while len(pending) > 2 * workers or (pending and pending[0][0] is None):  # bounded read-ahead
                result, nbytes = pending.popleft()
                yield (None if result is None else result.get()), nbytes
        while pending:
            result, nbytes = pending.popleft()
            yield (None if result is None else result.get()), nbytes
