"""The sampler's saved state: cursors keyed by source id, matched to the sources of a resumed run.

State version 2 (``MixtureSampler.state_dict``)::

    {"version": 2,
     "sources": {sid: {epoch, block_start, block_len, seq_len, seed, taken, sequences_total, tokens_total, order,
                       "path": configured path when saved, "fingerprint": {...}, "stream": {...} (streamed only)}},
     "mixture": {"weights": {sid: w}, "counts": {sid: c}, "total": k}}

**Matching** a saved cursor to a source of the run: by source id first (the data's order key: a moved folder
matches), then by configured path (the same folder whose first tokens changed). Unmatched cursors are carried
along untouched. **Changed data**: a matched cursor whose fingerprint differs from the source's stops the run
with `DataChanged` (one line naming the source and what changed) unless ``accept_changed`` (the config's
``data.accept_changed_data``); then the cursor is mapped: when the file holding its block start is unchanged and
the block start did not move, it continues exactly; otherwise a fresh block opens at the same token of the same
file (`fingerprint.map_offset`), or at the start of the next unchanged file when that file changed or went. A
streamed source restarts at the next epoch (its token counts are not known ahead); a source switched between
``data.type`` "tokenized" and "streaming" keeps its cursor (its token offsets are the same for the same
documents). A note says so.

**Version 1** (cursors keyed by path, permutations seeded by ``sha256(path)``): each cursor is matched by path and
keeps ``order = sha256(path)``, so a resumed old checkpoint draws exactly the batches it would have drawn; its
fingerprint is unknown (no change check) and a note says so.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Tuple

from .errors import DataChanged
from .fingerprint import SourceIdentity, describe_change, map_offset

STATE_VERSION = 2


def upgrade_v1(state: Mapping[str, Any], identities: Mapping[str, SourceIdentity], path_hash: Callable) -> dict:
    """A version-1 state as version 2: cursors re-keyed by the id of the source at their path (``path:P`` for a
    path no source has), each keeping its ``sha256(path)`` order key."""
    sid_of = {p: (identities[p].sid if p in identities else f"path:{p}") for p in state["sources"]}
    sources = {sid_of[p]: dict(c, order=path_hash(p), path=p, fingerprint=None) for p, c in state["sources"].items()}
    mixture = state["mixture"]
    return {
        "version": STATE_VERSION,
        "sources": sources,
        "mixture": {
            "weights": {sid_of.get(p, f"path:{p}"): w for p, w in mixture["weights"].items()},
            "counts": {sid_of.get(p, f"path:{p}"): c for p, c in mixture["counts"].items()},
            "total": mixture["total"],
        },
        "upgraded_from": 1,
    }


def match_sources(
    state: Mapping[str, Any], identities: Mapping[str, SourceIdentity]
) -> Tuple[Dict[str, Tuple[str, dict]], Dict[str, dict]]:
    """``({source key: (saved sid, saved entry)}, {sid: unmatched entry})``: by id, then by path."""
    saved = dict(state["sources"])
    matched: Dict[str, Tuple[str, dict]] = {}
    for key, ident in identities.items():
        if ident.sid in saved:
            matched[key] = (ident.sid, saved.pop(ident.sid))
    for key in identities:
        if key not in matched:
            sid = next((s for s, e in saved.items() if e.get("path") == key), None)
            if sid is not None:
                matched[key] = (sid, saved.pop(sid))
    return matched, saved


def check_changes(
    matched: Mapping[str, Tuple[str, dict]], identities: Mapping[str, SourceIdentity], accept: bool
) -> Tuple[Dict[str, dict], List[str]]:
    """Matched entries, mapped where the data changed and ``accept``; raises `DataChanged` otherwise."""
    changes = []
    for key, (_, entry) in matched.items():
        old, new = entry.get("fingerprint"), identities[key].fingerprint
        what = describe_change(old, new) if old and new else None
        if what:
            changes.append((key, what))
    if changes and not accept:
        listed = "; ".join(f"source {k}: {w}" for k, w in changes)
        raise DataChanged(
            changes[0][0],
            f"data changed since the checkpoint was saved ({listed}): its batches would differ from the run's; restore "
            "the files, or set data.accept_changed_data=True to continue on the new files (docs/data.md)",
        )
    entries = {key: dict(entry) for key, (_, entry) in matched.items()}
    notes = []
    for key, what in changes:
        entries[key], where = _mapped(entries[key], identities[key].fingerprint)
        notes.append(f"data changed in source {key} ({what}); data.accept_changed_data=True: {where}")
    return entries, notes


def _mapped(entry: dict, new: Mapping[str, Any]) -> Tuple[dict, str]:
    old = entry["fingerprint"]
    entry = dict(entry, fingerprint=new)
    if (old["tokens"] is None) != (new["tokens"] is None):  # data.type switched: the same tokens if the same docs
        entry.pop("stream", None)
        return entry, (
            f"it switched between streamed and tokenized files and continues at token {entry['block_start']} of "
            f"epoch {entry['epoch']} (the same batches when the shards are the streamed documents tokenized)"
        )
    if old["tokens"] is None:  # streamed: token offsets of the new files are unknown
        entry.update(epoch=int(entry["epoch"]) + 1, block_start=0, block_len=0, taken=0)
        entry.pop("stream", None)
        return entry, f"it restarts at the beginning of epoch {entry['epoch']}"
    start = int(entry["block_start"])
    resume_at = start + (int(entry["block_len"]) * int(entry["seq_len"]) if int(entry["taken"]) else 0)
    where, exact = map_offset(old, new, start)
    if exact and where == start:
        text = f"it continues at token {start} as saved"
    else:
        where, exact = map_offset(old, new, resume_at)
        entry.update(block_start=where, block_len=0, taken=0)  # block_len 0: a fresh block opens there
        how = "the same token of the same file" if exact else "the start of the next unchanged file"
        text = f"it continues at token {where} ({how}; was {resume_at})"
    if old.get("train_end") is not None and new.get("train_end") is not None:
        moved, _ = map_offset(old, new, int(old["train_end"]))
        if moved < int(new["train_end"]):
            text += f"; {int(new['train_end']) - moved} tokens held out for validation before are now trained on"
    return entry, text


def mixture_state(mixture: Any) -> dict:
    """The state of a `MixtureSampler` (module docstring)."""
    sources = {sid: dict(entry) for sid, entry in mixture.foreign.items()}
    sid = {k: mixture.identities[k].sid for k in mixture.keys}
    for key in mixture.keys:
        ident = mixture.identities[key]
        sources[sid[key]] = dict(mixture.samplers[key].state_dict(), path=key, fingerprint=ident.fingerprint)
    return {
        "version": STATE_VERSION,
        "sources": sources,
        "mixture": {
            "weights": {sid[k]: w for k, w in mixture.weights.items()},
            "counts": {sid[k]: c for k, c in mixture.counts.items()},
            "total": mixture.total,
        },
    }
