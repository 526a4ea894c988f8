"""What a data source is, independent of where it lives: its id, order key and fingerprint.

* **order key**: ``int.from_bytes(sha256(b"order-v2" + first_tokens)[:8], "little")`` where ``first_tokens`` are
  the source's first ``min(4096, n)`` tokens as little-endian int64. It seeds the sampler's permutations, so the
  order depends on the data, not on its path; a streamed source and the shards tokenized from the same documents
  share it (the same tokens), hence the same order.
* **source id**: the order key as 16 hex digits; the key of the source's cursor in the sampler state.
* **fingerprint**: ``{"files": [[name, bytes, tokens, docs], ...], "tokens": n, "train_end": t}``, ``name``
  relative to the source folder, ``tokens``/``docs`` None where not known before reading (raw files of a streamed
  source). A checkpoint records it; a resume compares it (`describe_change`) to catch added, removed or changed
  files. Files are compared by name, size and token and document counts, not hashed: an edit that keeps all
  three is not seen.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

ORDER_TOKENS = 4096


@dataclass(frozen=True)
class SourceIdentity:
    """A source's id (key of its saved cursor), order key (seed of its permutations) and fingerprint."""

    sid: str
    order: int
    fingerprint: Optional[Dict[str, Any]]


def order_key(first_tokens: np.ndarray) -> int:
    """The 64-bit order key of a source whose token stream starts with ``first_tokens`` (module docstring)."""
    head = np.asarray(first_tokens[:ORDER_TOKENS], dtype="<i8").tobytes()
    return int.from_bytes(hashlib.sha256(b"order-v2" + head).digest()[:8], "little")


def identity(first_tokens: np.ndarray, fingerprint: Optional[Dict[str, Any]]) -> SourceIdentity:
    order = order_key(first_tokens)
    return SourceIdentity(f"{order:016x}", order, fingerprint)


def make_fingerprint(files: Sequence[Tuple[str, int, Optional[int], Optional[int]]], train_end: Optional[int]) -> dict:
    """The fingerprint of a source made of ``files`` (name relative to the source, bytes, tokens, documents)."""
    rows = [[str(n), int(b), None if t is None else int(t), None if d is None else int(d)] for n, b, t, d in files]
    tokens = None if any(r[2] is None for r in rows) else sum(r[2] for r in rows)
    return {"files": rows, "tokens": tokens, "train_end": None if train_end is None else int(train_end)}


def _rows(fp: Mapping[str, Any]) -> Dict[str, Tuple]:
    return {r[0]: tuple(r[1:]) for r in fp["files"]}


def describe_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> Optional[str]:
    """What changed between two fingerprints, as a short phrase (None when the files are the same)."""
    a, b = _rows(old), _rows(new)
    parts: List[str] = []
    added = [n for n in b if n not in a]
    removed = [n for n in a if n not in b]
    changed = [n for n in a if n in b and a[n] != b[n]]
    for label, names in (("added", added), ("removed", removed)):
        if names:
            parts.append(f"{label} {_names(names)}")
    for n in changed[:3]:
        (ob, ot, od), (nb, nt, nd) = a[n], b[n]
        what = [f"{x} {u} -> {v}" for x, u, v in (("bytes", ob, nb), ("tokens", ot, nt), ("docs", od, nd)) if u != v]
        parts.append(f"changed {n} ({', '.join(what)})")
    if len(changed) > 3:
        parts.append(f"and {len(changed) - 3} more changed files")
    if not parts and [r[0] for r in old["files"]] != [r[0] for r in new["files"]]:
        parts.append("files reordered")
    return "; ".join(parts) or None


def _names(names: List[str]) -> str:
    shown = ", ".join(names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def map_offset(old: Mapping[str, Any], new: Mapping[str, Any], offset: int) -> Tuple[int, bool]:
    """Where token ``offset`` of the old files lies in the new ones: ``(new offset, exact)``.

    When the old file holding ``offset`` is unchanged in the new list, the same token of that file (exact);
    otherwise the start of the first later old file that is unchanged (not exact); past every file, the new total.
    Token counts must be known (shard fingerprints)."""
    a, b = _rows(old), _rows(new)
    new_start, pos = {}, 0
    for name, _, tokens, _ in new["files"]:
        new_start[name] = pos
        pos += int(tokens)
    total, base, found = pos, 0, False
    old_total = sum(int(r[2]) for r in old["files"])
    for name, _, tokens, _ in old["files"]:
        end = base + int(tokens)
        unchanged = name in b and b[name] == a[name]
        if not found and (offset < end or offset == end == old_total):
            found = True  # the file holding the offset
            if unchanged:
                return new_start[name] + offset - base, True
        elif found and unchanged:
            return new_start[name], False
        base = end
    return total, False
