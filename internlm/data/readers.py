"""Raw document readers: text where users keep it, read as a stream of documents in a fixed order.

    from internlm.data.readers import iter_documents
    for doc in iter_documents("corpus/", text_key="text"):   # Document(text, file, line)
        ...

Formats (by file name):

* ``.txt``: the whole file is one document (``line`` = 1);
* ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``: one JSON object per line, the document in ``text_key``; blank lines
  are skipped (``line`` = 1-based line number);
* ``.parquet``: one document per row, in column ``text_key`` (``line`` = 0-based row);
* ``.arrow``: an Arrow IPC file or stream (what ``datasets`` writes), one document per row (0-based row);
* a Hugging Face dataset saved with ``save_to_disk``: a folder with ``state.json`` (its ``_data_files`` are read)
  or a ``DatasetDict`` folder with ``dataset_dict.json`` (every split folder). Local data files of a Hub dataset
  are read as the files they are (jsonl, parquet, arrow).

Order: each input in the order given; a folder's files sorted by their path relative to that folder (hidden names
skipped), so the order does not depend on where the folder is mounted. Empty documents are dropped.

Reading is split in two so that parsing can run in worker processes: `iter_raw_batches` reads a file's raw records
(bytes lines, or column values) in batches of about ``batch_bytes``; `parse_batch` turns a batch into documents.
A malformed record raises `BadRecord` (one line naming the file and line/row), or is counted when ``skip_bad``.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, List, Optional, Tuple, Union

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".arrow")
HF_STATE = "state.json"
HF_DICT = "dataset_dict.json"
PathLike = Union[str, os.PathLike]


class BadRecord(ValueError):
    """A malformed or undecodable input record; the message names the file and line/row."""


@dataclass(frozen=True)
class Document:
    text: str
    file: str  # the file it was read from
    line: int  # 1-based line of .txt/.jsonl*, 0-based row of .parquet/.arrow


@dataclass(frozen=True)
class InputFile:
    path: str  # the file to open
    rel: str  # its path relative to the input it was found in (the sort key)
    kind: str  # "txt", "jsonl", "parquet" or "arrow"
    size: int  # bytes on disk (progress and resume identity)


@dataclass
class RawBatch:
    """Consecutive raw records of one file: bytes lines (jsonl), the file's bytes (txt) or column values."""

    file: str
    kind: str
    first: int  # line (1-based) or row (0-based) of records[0]
    records: List[Any]
    nbytes: int  # bytes of the file on disk this batch accounts for (progress)


def _kind(name: str) -> Optional[str]:
    if name.endswith(".txt"):
        return "txt"
    if name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".arrow"):
        return "arrow"
    return None


def _hf_data_files(folder: str) -> Optional[List[str]]:
    """The data files of a Hugging Face dataset folder in their order, or None if ``folder`` is not one."""
    state = os.path.join(folder, HF_STATE)
    if os.path.isfile(state):
        try:
            with open(state, encoding="utf-8") as f:
                names = [entry["filename"] for entry in json.load(f)["_data_files"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise BadRecord(f"{state}: not a Hugging Face dataset state file ({exc}); re-save it") from None
        return [os.path.join(folder, n) for n in names]
    index = os.path.join(folder, HF_DICT)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                splits = list(json.load(f)["splits"])
        except (ValueError, KeyError, TypeError) as exc:
            raise BadRecord(f"{index}: not a Hugging Face dataset_dict.json ({exc}); re-save it") from None
        out: List[str] = []
        for split in sorted(splits):
            out += _hf_data_files(os.path.join(folder, split)) or []
        return out
    return None


def _folder_files(root: str) -> List[InputFile]:
    found: List[Tuple[str, str]] = []
    hf = _hf_data_files(root)
    if hf is not None:
        found = [(p, os.path.relpath(p, root)) for p in hf]
    else:
        for here, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            hf = _hf_data_files(here) if here != root else None
            if hf is not None:  # a saved dataset inside the folder: only its data files
                dirs[:] = []
                found += [(p, os.path.relpath(p, root)) for p in hf]
                continue
            for n in names:
                if not n.startswith(".") and _kind(n):
                    path = os.path.join(here, n)
                    found.append((path, os.path.relpath(path, root)))
    found.sort(key=lambda pr: pr[1].split(os.sep))
    return [InputFile(p, rel, _kind(p) or "arrow", os.path.getsize(p)) for p, rel in found]


def list_files(inputs: Union[PathLike, Iterable[PathLike]]) -> List[InputFile]:
    """The files to read, in reading order (module docstring). Raises FileNotFoundError for a missing input and
    ValueError for a file of an unsupported type; an input with no readable file contributes nothing."""
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    files: List[InputFile] = []
    for item in items:
        path = os.fspath(item)
        if os.path.isdir(path):
            files += _folder_files(path)
        elif os.path.isfile(path):
            kind = _kind(path)
            if kind is None:
                raise ValueError(f"input {path!r}: unsupported file type; use one of {', '.join(SUFFIXES)}")
            files.append(InputFile(path, os.path.basename(path), kind, os.path.getsize(path)))
        else:
            raise FileNotFoundError(f"input {path!r} does not exist")
    return files


def _open_lines(path: str):
    """(binary line iterator, raw file object whose tell() is the position on disk)."""
    raw = open(path, "rb")
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    if path.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw)), raw
    return raw, raw


def _line_batches(f: InputFile, batch_bytes: int) -> Iterator[RawBatch]:
    stream, raw = _open_lines(f.path)
    lineno, first, records, size, done = 0, 1, [], 0, 0
    with raw, stream:
        while True:
            try:
                line = stream.readline()
            except Exception as exc:  # gzip.BadGzipFile, EOFError, zstandard.ZstdError (an Exception only)
                raise BadRecord(f"{f.path}:{lineno + 1}: cannot decompress ({exc}); the file is damaged") from None
            if not line:
                break
            lineno += 1
            if not records:
                first = lineno
            records.append(line)
            size += len(line)
            if size >= batch_bytes:
                pos = raw.tell()
                yield RawBatch(f.path, "jsonl", first, records, pos - done)
                records, size, done = [], 0, pos
    if records or done < f.size:
        yield RawBatch(f.path, "jsonl", first, records, f.size - done)


def _column_batches(f: InputFile, text_key: str, batch_bytes: int) -> Iterator[RawBatch]:
    import pyarrow as pa

    if f.kind == "parquet":
        import pyarrow.parquet as pq

        try:
            pfile = pq.ParquetFile(f.path)
        except (pa.ArrowException, OSError) as exc:
            raise BadRecord(f"{f.path}: not a readable parquet file ({exc})") from None
        schema, total = pfile.schema_arrow, pfile.metadata.num_rows
        batches = lambda: pfile.iter_batches(batch_size=max(1, batch_bytes // 1024), columns=[text_key])  # noqa: E731
    else:
        try:
            reader = _open_arrow(f.path)
        except (pa.ArrowException, OSError) as exc:
            raise BadRecord(f"{f.path}: not a readable Arrow file ({exc})") from None
        schema, total = reader.schema, None
        batches = lambda: reader  # noqa: E731
    if text_key not in schema.names:
        raise BadRecord(f"{f.path}: no column {text_key!r} (columns: {', '.join(schema.names)}); set --text-key")
    if not (pa.types.is_string(schema.field(text_key).type) or pa.types.is_large_string(schema.field(text_key).type)):
        raise BadRecord(f"{f.path}: column {text_key!r} holds {schema.field(text_key).type}, not strings")
    row, done = 0, 0
    for batch in batches():
        values = batch.column(batch.schema.get_field_index(text_key)).to_pylist()
        share = f.size * (row + len(values)) // total - done if total else 0
        yield RawBatch(f.path, f.kind, row, values, share)
        row, done = row + len(values), done + share
    if done < f.size:
        yield RawBatch(f.path, f.kind, row, [], f.size - done)


def _open_arrow(path: str):
    """A record-batch iterator with ``.schema`` over an Arrow IPC stream (datasets' format) or file."""
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(pa.memory_map(path))
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(pa.memory_map(path))

        class _FileBatches:
            schema = reader.schema

            def __iter__(self):
                return (reader.get_batch(i) for i in range(reader.num_record_batches))

        return _FileBatches()


def iter_raw_batches(f: InputFile, text_key: str = "text", batch_bytes: int = 1 << 20) -> Iterator[RawBatch]:
    """The raw records of one file, in order, about ``batch_bytes`` of text per batch (a .txt file is one batch).
    The batches' ``nbytes`` add up to the file's size on disk."""
    if f.kind == "txt":
        with open(f.path, "rb") as fh:
            yield RawBatch(f.path, "txt", 1, [fh.read()], f.size)
    elif f.kind == "jsonl":
        yield from _line_batches(f, batch_bytes)
    else:
        yield from _column_batches(f, text_key, batch_bytes)


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadRecord(f"{where}: not valid UTF-8 ({err.reason} at byte {err.start})") from None


def _parse(batch: RawBatch, i: int, text_key: str) -> Optional[str]:
    """Record ``i`` of the batch as text (None: a blank jsonl line, not a document)."""
    if batch.kind == "txt":
        return _decode(batch.records[i], batch.file)
    if batch.kind == "jsonl":
        where = f"{batch.file}:{batch.first + i}"
        line = _decode(batch.records[i], where)
        if batch.first + i == 1:
            line = line.lstrip("\ufeff")  # a byte-order mark some editors write
        if not line.strip():
            return None
        try:
            record = json.loads(line)
        except ValueError as err:
            raise BadRecord(f"{where}: invalid JSON ({getattr(err, 'msg', err)})") from None
        if not isinstance(record, dict) or text_key not in record:
            raise BadRecord(f"{where}: JSON line has no {text_key!r} field; set --text-key or fix the line")
        text = record[text_key]
        if not isinstance(text, str):
            raise BadRecord(f"{where}: {text_key!r} must be a string, got {type(text).__name__}")
        return text
    value = batch.records[i]
    if value is None:
        raise BadRecord(f"{batch.file} row {batch.first + i}: {text_key!r} is null")
    return value


def parse_batch(batch: RawBatch, text_key: str = "text", skip_bad: bool = False) -> Tuple[List[Document], int]:
    """The non-empty documents of a batch and the number of bad records skipped (always 0 unless ``skip_bad``)."""
    docs, bad = [], 0
    for i in range(len(batch.records)):
        try:
            text = _parse(batch, i, text_key)
        except BadRecord:
            if not skip_bad:
                raise
            bad += 1
            continue
        if text:
            docs.append(Document(text, batch.file, batch.first + i))
    return docs, bad


def iter_documents(
    inputs: Union[PathLike, Iterable[PathLike]], text_key: str = "text", skip_bad: bool = False
) -> Iterator[Document]:
    """Every non-empty document of the inputs, in reading order (module docstring)."""
    for f in list_files(inputs):
        for batch in iter_raw_batches(f, text_key):
            yield from parse_batch(batch, text_key, skip_bad)[0]


__all__ = [
    "BadRecord",
    "Document",
    "InputFile",
    "RawBatch",
    "SUFFIXES",
    "iter_documents",
    "iter_raw_batches",
    "list_files",
    "parse_batch",
]
