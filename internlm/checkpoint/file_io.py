"""File-level pieces of the checkpoint format: writing with a streaming checksum, verifying files against
meta.json, CPU snapshots, and the background writer of ``ckpt.async_save`` (see docs/checkpoint.md).

Every checkpoint file is written once, by one rank, through `write_file`, which hashes the bytes as
``torch.save`` produces them (CRC-32, ``zlib.crc32``: a few GB/s, no second pass over the file) and returns
the file's record ``{"bytes": n, "crc32": "8 hex digits"}``. `file_problem` reads a file back in 8 MiB blocks
and compares it with its record; `checkpoint_problems` does so for the files of a checkpoint (the one CRC loop
of the package: resume verification and ``from_pretrained``'s choice of a step both use it).
"""

from __future__ import annotations

import os
import threading
import zlib
from typing import Any, Callable, Collection, Dict, List, Optional, Tuple

import torch

from .files import META_FILE, read_meta

_BLOCK = 8 * 1024 * 1024


class _HashingWriter:
    """A write-only file object that checksums and counts what passes through it."""

    def __init__(self, file, cancel: Optional[threading.Event] = None) -> None:
        self._file = file
        self._cancel = cancel
        self.crc = 0
        self.bytes = 0
        self.os_error: Optional[OSError] = None  # torch.save reports a failed write as its own "unexpected pos"

    def write(self, data) -> int:
        if self._cancel is not None and self._cancel.is_set():
            raise RuntimeError("cancelled")  # FileWriter.cancel: the save is abandoned
        view = memoryview(data)
        self.crc = zlib.crc32(view, self.crc)
        self.bytes += view.nbytes
        try:
            return self._file.write(view)
        except OSError as exc:
            self.os_error = exc
            raise

    def flush(self) -> None:
        self._file.flush()


def _record(crc: int, size: int) -> Dict[str, Any]:
    return {"bytes": size, "crc32": f"{crc & 0xFFFFFFFF:08x}"}


def write_file(obj: Any, path: str, cancel: Optional[threading.Event] = None) -> Dict[str, Any]:
    """``torch.save(obj)`` to ``path`` (flushed to disk with fsync); returns its record (bytes, crc32). Once
    ``cancel`` is set, the next write raises RuntimeError."""
    with open(path, "wb") as f:
        writer = _HashingWriter(f, cancel)
        try:
            torch.save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
        except Exception:
            if writer.os_error is not None:  # the cause (e.g. ENOSPC), not torch's consequence
                raise writer.os_error from None
            raise
    return _record(writer.crc, writer.bytes)


def file_record(path: str) -> Dict[str, Any]:
    """The record (bytes, crc32) of a file as it is on disk, read in blocks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_BLOCK)
            if not block:
                break
            crc = zlib.crc32(block, crc)
            size += len(block)
    return _record(crc, size)


def file_problem(folder: str, name: str, record: Dict[str, Any], quick: bool = False) -> Optional[str]:
    """None if ``folder/name`` matches ``record`` (size, then checksum; ``quick``: the size only), else what is
    wrong, naming the file."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return f"{name} is missing"
    size = os.path.getsize(path)
    if size != record["bytes"]:
        return f"{name} has {size} bytes, {record['bytes']} were written"
    if quick:
        return None
    found = file_record(path)["crc32"]
    if found != record["crc32"]:
        return f"{name} fails its checksum (crc32 {found}, {record['crc32']} was written)"
    return None


def checkpoint_problems(path: str, names: Optional[Collection[str]] = None, quick: bool = False) -> List[str]:
    """What is wrong with checkpoint ``path`` (empty: every file matches its size and CRC-32 in meta.json),
    one line per damaged or missing file, naming it. ``names`` restricts the check to those files; ``quick``
    compares sizes only (no file is read). Checkpoints from before checksums (no ``files`` in meta.json) are
    not checked."""
    try:
        meta = read_meta(path)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        return [f"{META_FILE} cannot be read ({exc})"]
    files = meta.get("files")
    if files is None:
        return []
    problems = []
    for name in sorted(files if names is None else names):
        problem = file_problem(path, name, files[name], quick=quick)
        if problem:
            problems.append(problem)
    return problems


def cpu_snapshot(obj: Any) -> Any:
    """A copy of ``obj`` (nested dicts, lists, tuples) whose tensors are detached CPU copies, so that training
    may change the originals while the copy is written."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, cpu_snapshot(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_snapshot(v) for v in obj)
    return obj


class FileWriter:
    """Writes ``(name, object)`` pairs into a folder with `write_file`, now (``background=False``) or in a
    thread; `wait` returns the records ``{name: record}`` or raises what the writing raised.

    The objects are dropped as soon as they are written (a CPU snapshot is freed file by file).
    """

    def __init__(self, folder: str, files: List[Tuple[str, Any]], background: bool) -> None:
        self.folder = folder
        self._files = list(files)
        self.records: Dict[str, Dict[str, Any]] = {}
        self.error: Optional[BaseException] = None
        self.failed_file: Optional[str] = None  # the file being written when the error came
        self._thread: Optional[threading.Thread] = None
        self._cancel = threading.Event()
        if background:
            self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
            self._thread.start()
        else:
            self._run()

    def _run(self) -> None:
        name = None
        try:
            while self._files:
                name, obj = self._files.pop(0)
                self.records[name] = write_file(obj, os.path.join(self.folder, name), self._cancel)
                del obj
        except BaseException as exc:  # reported by wait(), on the training thread
            self.error, self.failed_file = exc, name
            self._files = []

    @property
    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def wait(self, on_wait: Optional[Callable[[], None]] = None) -> Dict[str, Dict[str, Any]]:
        if self._thread is not None:
            if self._thread.is_alive() and on_wait is not None:
                on_wait()
            self._thread.join()
            self._thread = None
        if self.error is not None:
            error = self.error
            what = f"{error.strerror} (errno {error.errno})" if isinstance(error, OSError) and error.strerror else error
            where = f"writing checkpoint file {self.failed_file} into {self.folder}"
            raise RuntimeError(f"{where} failed: {what}") from error
        return self.records

    def cancel(self) -> None:
        """Abandon the writing: the thread stops at its next write and is joined (a thread still writing when the
        interpreter exits aborts the process: "terminate called without an active exception", status 134). The
        files written so far stay; nothing is raised."""
        self._cancel.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._files = []

    def remove_written(self) -> None:
        """Delete the files this writer created (after a failure: they are of no use, and free the space the
        failure report needs). Call after `wait`."""
        for name in [*self.records, self.failed_file]:
            if name is not None and os.path.exists(os.path.join(self.folder, name)):
                os.remove(os.path.join(self.folder, name))


__all__ = ["FileWriter", "checkpoint_problems", "cpu_snapshot", "file_problem", "file_record", "write_file"]
