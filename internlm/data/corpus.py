"""Raw text inputs: which files to read and how they split into documents.

A ``.txt`` file is one document. A ``.jsonl`` file holds one document per line, in the line's ``"text"``
field (blank lines are skipped). Folders are searched recursively for both, in sorted path order.
Everything here streams: files are read in chunks of lines, never all at once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Union

TEXT_SUFFIXES = (".txt", ".jsonl")


@dataclass
class RawChunk:
    """Consecutive raw records of one file: the whole text of a ``.txt``, or lines of a ``.jsonl``."""

    path: str
    first_line: int  # 1-based line number of records[0] (jsonl); 1 for txt
    is_jsonl: bool
    records: List[str]
    nbytes: int  # raw size, for progress reporting


def list_input_files(inputs: Iterable[Union[str, os.PathLike]]) -> List[str]:
    """Expand files and folders into the ordered list of ``.txt``/``.jsonl`` files to read."""
    inputs = list(inputs)
    files: List[str] = []
    for item in inputs:
        path = os.fspath(item)
        if os.path.isdir(path):
            found = []
            for root, dirs, names in os.walk(path):
                dirs.sort()
                found.extend(os.path.join(root, n) for n in names if n.endswith(TEXT_SUFFIXES))
            files.extend(sorted(found))
        elif os.path.isfile(path):
            if not path.endswith(TEXT_SUFFIXES):
                raise ValueError(f"input {path!r}: unsupported file type; use .txt (one document) or .jsonl")
            files.append(path)
        else:
            raise FileNotFoundError(f"input {path!r} does not exist")
    if not files:
        raise ValueError(f"no .txt or .jsonl files found in inputs {[os.fspath(i) for i in inputs]}")
    return files


def iter_raw_chunks(files: Iterable[str], chunk_bytes: int = 1 << 20) -> Iterator[RawChunk]:
    """Yield the files' records in order, about ``chunk_bytes`` of text per chunk."""
    for path in files:
        if not path.endswith(".jsonl"):
            with open(path, "rb") as f:
                raw = f.read()
                yield RawChunk(path, 1, False, [_decode(raw, path, 1)], len(raw))
            continue
        with open(path, "rb") as f:
            records: List[str] = []
            first, size = 1, 0
            for lineno, raw in enumerate(f, start=1):
                if not records:
                    first = lineno
                records.append(_decode(raw, path, lineno))
                size += len(raw)
                if size >= chunk_bytes:
                    yield RawChunk(path, first, True, records, size)
                    records, size = [], 0
            if records:
                yield RawChunk(path, first, True, records, size)


def _decode(raw: bytes, path: str, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({err.reason} at byte {err.start})") from None


def parse_chunk(chunk: RawChunk) -> List[str]:
    """The documents of a chunk; an empty document (``""``) is dropped."""
    if not chunk.is_jsonl:
        return [t for t in chunk.records if t]
    docs = []
    for i, line in enumerate(chunk.records):
        if not line.strip():
            continue
        where = f"{chunk.path}:{chunk.first_line + i}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: invalid JSON ({err.msg})") from None
        if not isinstance(record, dict) or "text" not in record:
            raise ValueError(f"{where}: JSON line has no 'text' field; every jsonl line needs {{\"text\": ...}}")
        if not isinstance(record["text"], str):
            raise ValueError(f"{where}: 'text' must be a string, got {type(record['text']).__name__}")
        if record["text"]:
            docs.append(record["text"])
    return docs


def iter_documents(inputs: Iterable[Union[str, os.PathLike]]) -> Iterator[str]:
    """Stream the documents of files and folders, in input order."""
    for chunk in iter_raw_chunks(list_input_files(inputs)):
        yield from parse_chunk(chunk)
