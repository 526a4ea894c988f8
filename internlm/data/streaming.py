"""``data.type = "streaming"``: raw documents tokenized while training, drawn exactly like tokenized shards.

A streamed source is a folder (or file) of documents `internlm.data.readers` reads (``.txt``, ``.jsonl``,
``.jsonl.gz``/``.zst``, ``.parquet``, ``.arrow``, a saved Hugging Face dataset), in the readers' order. Each
document becomes ``encode(text) + [eos]`` with ``data.tokenizer_path``, exactly as ``tools/tokenizer.py`` writes
it, so the source's token stream is the one the tokenized route would store, and the sampler draws the same
windows from it: **the same batches as tokenizing first** (with no held-out tail: ``valid_ratio`` must be 0 or
``valid_folder`` set, since a stream's end is found only by reading it).

**Reading ahead.** Per epoch a `_Buffer` holds the tokens from the start of the document holding the current
sampler block to as far as the sampler asked (``windows_from`` reads ``block_seqs * seq_len + 1`` tokens past a
block start, or to the end, which is how the last block's size and the epoch's end are found). A background
thread reads raw batches and has ``data.stream_workers`` processes tokenize them (0: the thread itself), results
kept in input order, at most ``2 * workers + 2`` batches ahead: the tokens never depend on the worker count.
Each epoch re-reads the files from the start.

**Resume.** ``position_state`` is ``{"epoch", "base", "file", "record"}``: the buffer's first token ``base`` and the
document there (file index in reading order, record index in the file, 0-based). A resumed source reopens its
reader at that record, so nothing before it is tokenized again.

**Console.** ``messages`` gives, at most every ``REPORT_EVERY`` seconds, the tokenizing rate, and a warning when a
batch waited more than ``WAIT_WARN`` seconds for tokens (not counting the first batch of a reader's life).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import time
import weakref
from collections import deque
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .errors import DataError
from .fingerprint import ORDER_TOKENS, identity, make_fingerprint
from .readers import InputFile, RawBatch, iter_raw_batches, list_files, parse_batch
from .tokenizer import Tokenizer

REPORT_EVERY = 60.0  # seconds between throughput lines
WAIT_WARN = 1.0  # a batch waiting longer than this for tokens is warned about
BATCH_BYTES = 1 << 18  # raw bytes per tokenizer job

_worker: Dict[str, Any] = {}


def _init_worker(model_path: str, text_key: str) -> None:
    _worker.update(tok=Tokenizer(model_path), text_key=text_key)


def _encode(batch: RawBatch, file_index: int, ordinal: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``(tokens, lengths, records, file)``: every document ``encode(text) + [eos]`` concatenated (int64), the
    documents' lengths and their record indices in the file (``ordinal`` is the batch's first)."""
    tok: Tokenizer = _worker["tok"]
    docs, _ = parse_batch(batch, _worker["text_key"])
    ids = tok.encode_batch([d.text for d in docs])
    lengths = np.array([len(x) + 1 for x in ids], dtype=np.int64)
    flat = np.empty(int(lengths.sum()), dtype=np.int64)
    pos = 0
    for doc, n in zip(ids, lengths):
        flat[pos : pos + n - 1] = doc
        flat[pos + n - 1] = tok.eos_id
        pos += int(n)
    records = np.array([ordinal + d.line - batch.first for d in docs], dtype=np.int64)
    return flat, lengths, records, file_index


class _Reader:
    """A background thread tokenizing the files from record ``record`` of file ``file`` on, into ``self.out``."""

    def __init__(self, files: List[InputFile], model: str, text_key: str, workers: int, file: int, record: int):
        self.out: "queue.Queue[Any]" = queue.Queue(maxsize=2 * workers + 2)
        self._stop = threading.Event()
        self._args = (files, model, text_key, workers, file, record)
        self._thread = threading.Thread(target=self._run, name="internlm-streaming", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self.out.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _jobs(self):
        files, _, text_key, _, first_file, first_record = self._args
        for fi in range(first_file, len(files)):
            ordinal = 0
            for batch in iter_raw_batches(files[fi], text_key, BATCH_BYTES):
                n = len(batch.records)
                skip = first_record - ordinal if fi == first_file else 0
                if skip < n:
                    if skip > 0:
                        batch = RawBatch(batch.file, batch.kind, batch.first + skip, batch.records[skip:], 0)
                    yield batch, fi, ordinal + max(skip, 0)
                ordinal += n

    def _run(self) -> None:
        _, model, text_key, workers, _, _ = self._args
        pool = None
        try:
            if workers > 0:
                pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(model, text_key))
            else:
                _init_worker(model, text_key)
            pending: deque = deque()
            for job in self._jobs():
                pending.append(pool.apply_async(_encode, job) if pool else job)
                while len(pending) > (2 * workers if pool else 0):
                    if not self._emit(pending.popleft(), pool):
                        return
            while pending:
                if not self._emit(pending.popleft(), pool):
                    return
            self._put(None)  # the end of the files
        except BaseException as exc:  # shown to the training thread, which raises it
            self._put(exc)
        finally:
            if pool is not None:
                pool.terminate()

    def _emit(self, item: Any, pool: Any) -> bool:
        return self._put(item.get() if pool else _encode(*item))

    def close(self) -> None:
        self._stop.set()


class _Buffer:
    """The tokens of one epoch from ``base`` (a document start) on, filled from a `_Reader` on demand."""

    def __init__(self, source: "StreamingSource", base: int, file: int, record: int) -> None:
        # a proxy, not a reference: no cycle, so the source's finalizer closes the readers as soon as its loader goes
        self.source = weakref.proxy(source)
        self.base, self.file, self.record = base, file, record
        self.tokens = np.zeros(0, np.int64)
        self.ends = np.zeros(0, np.int64)  # absolute document ends
        self.starts = np.zeros((0, 2), np.int64)  # (file, record) of each buffered document
        self.eof = False
        self.reader: Optional[_Reader] = None
        self.fresh = True  # no batch has waited on this reader yet (its start-up is not a stall)

    @property
    def end(self) -> int:
        return self.base + int(self.tokens.size)

    def fill_to(self, offset: int) -> None:
        while self.end < offset and not self.eof:
            if self.reader is None:
                s = self.source
                self.reader = _Reader(s.files, s.tokenizer_path, s.text_key, s.workers, self.file, self.record)
            started = time.perf_counter()
            item = self.reader.out.get()
            self.source.note_wait(time.perf_counter() - started, self.fresh)
            self.source.tokens_read += 0 if item is None or isinstance(item, BaseException) else int(item[0].size)
            if item is None:
                self.eof = True
            elif isinstance(item, BaseException):
                raise item
            else:
                flat, lengths, records, fi = item
                self.ends = np.concatenate([self.ends, self.end + np.cumsum(lengths)])
                self.starts = np.concatenate([self.starts, np.stack([np.full_like(records, fi), records], axis=1)])
                self.tokens = np.concatenate([self.tokens, flat])

    def trim(self, offset: int) -> None:
        """Drop what lies before the start of the document holding token ``offset``."""
        k = int(np.searchsorted(self.ends, offset, side="right"))  # documents ending at or before offset
        if k == 0:
            return
        new_base = int(self.ends[k - 1])
        self.tokens = self.tokens[new_base - self.base :].copy()
        self.base, self.ends = new_base, self.ends[k:]
        if self.starts.shape[0] > k:
            self.file, self.record = (int(v) for v in self.starts[k])
        else:  # nothing buffered past the cut yet: the reader's next document starts there
            self.file, self.record = self._next_position()
        self.starts = self.starts[k:]

    def _next_position(self) -> Tuple[int, int]:
        last_file, last_record = (int(v) for v in self.starts[-1])
        return last_file, last_record + 1

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()


class StreamingSource:
    """A source of raw documents tokenized while training (module docstring); the interface of `TokenSource`."""

    def __init__(self, key: str, files: List[InputFile], tokenizer_path: str, text_key: str, workers: int) -> None:
        self.key, self.files, self.tokenizer_path = key, files, tokenizer_path
        self.text_key, self.workers = text_key, workers
        self._buffers: Dict[int, _Buffer] = {}
        self._finalizer = weakref.finalize(self, _close_all, self._buffers)
        self._wait, self._waits, self.tokens_read, self._last_report = 0.0, 0, 0, time.monotonic()
        first = self._buffer(0)
        first.fill_to(ORDER_TOKENS)
        head = first.tokens[:ORDER_TOKENS]
        fingerprint = make_fingerprint([(f.rel, f.size, None, None) for f in files], None)
        self.identity = identity(head, fingerprint)

    def _buffer(self, epoch: int) -> _Buffer:
        if epoch not in self._buffers:
            if self._buffers and epoch < max(self._buffers):
                raise RuntimeError(f"{self.key}: epoch {epoch} asked after epoch {max(self._buffers)}")
            self._buffers[epoch] = _Buffer(self, 0, 0, 0)
        return self._buffers[epoch]

    def windows_from(self, epoch: int, start: int, seq_len: int, cap: int) -> int:
        buf = self._buffer(epoch)
        buf.fill_to(start + cap * seq_len + 1)
        if start == 0 and buf.eof and buf.end < seq_len + 1:
            raise DataError(
                self.key,
                f"streamed source {self.key!r} has {buf.end} tokens, fewer than one sequence needs "
                f"(seq_len + 1 = {seq_len + 1}); add documents or lower data.seq_len",
            )
        return min(cap, max((buf.end - 1 - start) // seq_len, 0))

    def read(self, epoch: int, start: int, stop: int) -> np.ndarray:
        buf = self._buffer(epoch)
        buf.fill_to(stop)
        return buf.tokens[start - buf.base : stop - buf.base]

    def doc_ends(self, epoch: int, start: int, stop: int) -> np.ndarray:
        buf = self._buffer(epoch)
        buf.fill_to(stop)
        lo, hi = np.searchsorted(buf.ends, [start, stop], side="right")
        return buf.ends[lo:hi].copy()

    def release(self, epoch: int, start: int) -> None:
        """The cursor is at ``(epoch, start)``: free earlier epochs and what precedes its document."""
        for e in [e for e in self._buffers if e < epoch]:
            self._buffers.pop(e).close()
        if epoch in self._buffers:
            self._buffers[epoch].trim(start)

    def position_state(self) -> Dict[str, int]:
        epoch = max(self._buffers)
        buf = self._buffers[epoch]
        return {"epoch": epoch, "base": buf.base, "file": buf.file, "record": buf.record}

    def restore_position(self, state: Optional[Dict[str, Any]], epoch: int, block_start: int) -> None:
        """Reopen the reader of ``epoch`` at the saved document (or at the epoch start without one)."""
        for buf in self._buffers.values():
            buf.close()
        self._buffers.clear()
        if state and int(state["epoch"]) == epoch and int(state["base"]) <= block_start:
            self._buffers[epoch] = _Buffer(self, int(state["base"]), int(state["file"]), int(state["record"]))
        else:
            self._buffers[epoch] = _Buffer(self, 0, 0, 0)

    def note_wait(self, seconds: float, fresh: bool) -> None:
        if not fresh:
            self._wait, self._waits = self._wait + seconds, self._waits + 1

    def messages(self) -> List[str]:
        """Console lines after a batch: a wait for tokens over WAIT_WARN, and the rate every REPORT_EVERY s."""
        out = []
        for buf in self._buffers.values():
            buf.fresh = False
        if self._waits and self._wait > WAIT_WARN:
            out.append(
                f"warning: the step waited {self._wait:.1f} s for streamed data of {self.key}; raise "
                f"data.stream_workers (now {self.workers}) or tokenize it first with tools/tokenizer.py"
            )
        self._wait, self._waits = 0.0, 0
        now = time.monotonic()
        if now - self._last_report >= REPORT_EVERY:
            rate = self.tokens_read / (now - self._last_report)
            out.append(f"streaming {self.key}: {rate:,.0f} tokens/s tokenized ({self.workers} workers)")
            self._last_report, self.tokens_read = now, 0
        return out


def _close_all(buffers: Dict[int, _Buffer]) -> None:
    for buf in buffers.values():
        buf.close()


def open_streaming_source(key: str, data: Any) -> StreamingSource:
    """The streamed source at ``key`` (a folder or file of documents) for the ``data`` section."""
    path = data.tokenizer_path
    if not path:
        raise DataError(key, "data.type='streaming' tokenizes while training: set data.tokenizer_path")
    files = list_files(key)
    if not files:
        raise DataError(key, f"streamed source {key!r} holds no readable documents (.txt, .jsonl, .parquet, ...)")
    workers = int(getattr(data, "stream_workers", 1))
    source = StreamingSource(key, files, os.fspath(path), getattr(data, "text_key", "text"), workers)
    return source
