"""Deterministic mixture sampling of packed sequences, resumable per source.

Every source (data folder) is one token stream whose training range is ``[0, train_end)``. A
sequence of length ``L`` starting at token ``t`` needs ``t + L + 1 <= train_end`` (the extra token is
the last label).

**Within a source** sequences are drawn block by block. A block starts at token ``b`` and holds
``n = min(block_seqs, (train_end - 1 - b) // L)`` consecutive windows ``b, b + L, ..., b + (n-1) L``;
they are visited in the order of a permutation seeded by ``(seed, order, epoch, b)``. ``order`` is the
source's *order key*, 64 bits of sha256 of its first tokens (`internlm.data.fingerprint.order_key`): it depends
on the data, not on where it lives, so a moved folder keeps its order. A cursor keeps the key it started with
(checkpoints of state version 1 keep ``sha256(path)``, their key then). The next block starts at ``b + n L``.
When no window fits, the source wraps: ``epoch += 1`` and ``b = 0``.

**Across sources** the ``k``-th sequence of the run (k = 0, 1, ...) comes from the source ``i``
maximising ``(k + 1) * w_i / sum(w) - c_i`` (``c_i``: sequences already taken from it under the
current weights; ties go to the smallest source id, then path). This largest-deficit rule, evaluated in exact rational
arithmetic, keeps ``|c_i - k * w_i / sum(w)|`` bounded for every prefix, whatever ``k``: below 1/2 for
two sources, below about one sequence for a handful.

The sequence stream therefore depends only on the seed, the data and the weights; a global batch of
``G`` sequences is the next ``G`` of them, whatever the number of processes.

**State** (``state_dict``) holds one cursor per source ``(epoch, b, n, L, seed, taken, order)``, keyed by the
source id (`internlm.data.sampler_state`, which also matches saved cursors to sources and migrates version 1). A
loader that loads it resumes exactly when ``L``, the seed and the block layout are unchanged. When
they differ (a new phase with another ``seq_len``), the source continues at the next block
boundary ``b + n L`` (or at ``b`` if nothing of the block was taken), so consumed tokens are never
revisited in the same epoch; at most the untaken rest of one block is skipped. Mixture counts are
kept while the weights are unchanged and restart when they change. Cursors of sources absent from
the current mixture are carried along untouched.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any, Dict, List, Mapping, Optional, Protocol, Tuple, Union

import numpy as np

from .fingerprint import SourceIdentity
from .sampler_state import STATE_VERSION, check_changes, match_sources, mixture_state, upgrade_v1


def path_hash(key: str) -> int:
    """A 64-bit integer from the source path, stable across processes and Python versions: the order key of
    state version 1 (and of a sampler built without identities, as in unit tests)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")


class Extent(Protocol):
    """How far a source goes: ``windows_from(epoch, start, seq_len, cap)`` is ``min(cap, (train_end - 1 -
    start) // seq_len)`` (at least 0). A streamed source answers it by reading ahead (its end is found, not known)."""

    def windows_from(self, epoch: int, start: int, seq_len: int, cap: int) -> int: ...


class FixedExtent:
    """The extent of a source of known length ``train_end``."""

    def __init__(self, train_end: int) -> None:
        self.train_end = int(train_end)

    def windows_from(self, epoch: int, start: int, seq_len: int, cap: int) -> int:
        return min(cap, max((self.train_end - 1 - start) // seq_len, 0))


@dataclass
class Cursor:
    epoch: int = 0
    block_start: int = 0  # token offset of the current block
    block_len: int = 0  # sequences in the current block
    seq_len: int = 0
    seed: int = 0
    taken: int = 0  # sequences of the current block already returned
    sequences_total: int = 0  # over the life of the run, for metrics
    tokens_total: int = 0
    order: int = 0  # the order key seeding this cursor's permutations, kept for its whole life


class SourceSampler:
    """Yields start offsets of sequences of one source, block-shuffled, wrapping at epoch ends."""

    def __init__(
        self,
        key: str,
        train_end: Union[int, Extent],
        seq_len: int,
        seed: int,
        block_seqs: int = 1024,
        order: Optional[int] = None,
    ) -> None:
        if block_seqs < 1:
            raise ValueError(f"block_seqs must be >= 1, got {block_seqs}")
        self.key, self.seq_len, self.seed, self.block_seqs = key, seq_len, seed, block_seqs
        self.extent = train_end if hasattr(train_end, "windows_from") else FixedExtent(int(train_end))
        self.order = path_hash(key) if order is None else int(order)
        self.cursor = Cursor(seq_len=seq_len, seed=seed, order=self.order)
        self._open_block(0, 0)

    def _windows_from(self, epoch: int, start: int) -> int:
        return self.extent.windows_from(epoch, start, self.seq_len, self.block_seqs)

    def _open_block(self, epoch: int, start: int) -> None:
        if self._windows_from(epoch, start) == 0:
            if start == 0:  # not one window in the whole source
                end = getattr(self.extent, "train_end", "too few")
                raise ValueError(
                    f"source {self.key!r} has {end} training tokens, fewer than one sequence needs "
                    f"(seq_len + 1 = {self.seq_len + 1}); add data, lower seq_len or lower valid_ratio"
                )
            epoch, start = epoch + 1, 0
        c = self.cursor
        c.epoch, c.block_start, c.taken = epoch, start, 0
        c.block_len = self._windows_from(epoch, start)
        c.seq_len, c.seed = self.seq_len, self.seed
        self._perm: Optional[np.ndarray] = None

    def _permutation(self) -> np.ndarray:
        if self._perm is None:
            c = self.cursor
            rng = np.random.default_rng([self.seed, c.order, c.epoch, c.block_start])
            self._perm = rng.permutation(c.block_len)
        return self._perm

    def next_position(self) -> Tuple[int, int]:
        """``(epoch, token offset)`` of the next sequence; advances the cursor."""
        c = self.cursor
        if c.taken == c.block_len:
            self._open_block(c.epoch, c.block_start + c.block_len * c.seq_len)
        start = c.block_start + int(self._permutation()[c.taken]) * self.seq_len
        c.taken += 1
        c.sequences_total += 1
        c.tokens_total += self.seq_len
        return c.epoch, start

    def next_start(self) -> int:
        """Token offset of the next sequence; advances the cursor."""
        return self.next_position()[1]

    def state_dict(self) -> Dict[str, int]:
        return asdict(self.cursor)

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume exactly when compatible, else continue at the next block boundary (module docstring)."""
        old = Cursor(**{k: int(v) for k, v in state.items() if k in Cursor.__dataclass_fields__})
        compatible = (
            old.seq_len == self.seq_len
            and old.seed == self.seed
            and old.block_len > 0
            and old.block_len == self._windows_from(old.epoch, old.block_start)
        )
        if compatible:
            self.cursor = old
            self._perm = None
            return
        self.cursor.sequences_total, self.cursor.tokens_total = old.sequences_total, old.tokens_total
        self.cursor.order = old.order
        resume_at = old.block_start + (old.block_len * old.seq_len if old.taken > 0 else 0)
        self._open_block(old.epoch, resume_at)


class MixtureSampler:
    """The global sequence stream over weighted sources: a list of ``(source key, start)`` per batch.

    ``identities`` maps each source key (its configured path) to its `SourceIdentity` (id, order key,
    fingerprint); without it a source's id is its path and its order key ``sha256(path)`` (as in state version 1).
    """

    def __init__(
        self,
        train_ends: Mapping[str, Union[int, Extent]],
        weights: Mapping[str, float],
        seq_len: int,
        seed: int,
        block_seqs: int = 1024,
        identities: Optional[Mapping[str, SourceIdentity]] = None,
    ) -> None:
        if set(train_ends) != set(weights):
            raise ValueError(f"sources {sorted(train_ends)} and weights {sorted(weights)} name different paths")
        if not weights:
            raise ValueError("the mixture needs at least one source")
        for key, w in weights.items():
            if not (isinstance(w, (int, float)) and w >= 0 and w != float("inf")):
                raise ValueError(f"weight of source {key!r} must be a finite number >= 0, got {w!r}")
        if sum(weights.values()) <= 0:
            raise ValueError(f"source weights {dict(weights)} sum to zero")
        self.identities: Dict[str, SourceIdentity] = {
            k: (identities[k] if identities is not None else SourceIdentity(k, path_hash(k), None)) for k in weights
        }
        # sorted by source id (then path): independent of the config's dict order and of where the data lives
        self.keys: List[str] = sorted(weights, key=lambda k: (self.identities[k].sid, k))
        self.weights = {k: float(weights[k]) for k in self.keys}
        self._w = [Fraction(self.weights[k]) for k in self.keys]
        self._w_total = sum(self._w)
        self.samplers = {
            k: SourceSampler(k, train_ends[k], seq_len, seed, block_seqs, self.identities[k].order) for k in self.keys
        }
        self.counts = {k: 0 for k in self.keys}
        self.total = 0
        self.foreign: Dict[str, Dict[str, Any]] = {}  # saved cursors of sources not in this mixture, by source id

    def _pick(self) -> str:
        # argmax_i (k + 1) w_i / W - c_i, compared exactly as (k + 1) w_i - c_i W
        k1 = self.total + 1
        best, best_score = self.keys[0], None
        for key, w in zip(self.keys, self._w):
            score = k1 * w - self.counts[key] * self._w_total
            if best_score is None or score > best_score:
                best, best_score = key, score
        return best

    def next_picks(self, count: int) -> List[Tuple[str, int, int]]:
        """The next ``count`` sequences of the stream as ``(source key, epoch, start token)``."""
        out = []
        for _ in range(count):
            key = self._pick()
            self.counts[key] += 1
            self.total += 1
            out.append((key, *self.samplers[key].next_position()))
        return out

    def next_sequences(self, count: int) -> List[Tuple[str, int]]:
        """The next ``count`` sequences of the stream as ``(source key, start token)``."""
        return [(key, start) for key, _, start in self.next_picks(count)]

    def state_dict(self) -> Dict[str, Any]:
        return mixture_state(self)

    def resolve_state(self, state: Mapping[str, Any], accept_changed: bool = False) -> Resolved:
        """Match a saved state to this mixture's sources (`internlm.data.sampler_state`); raises `DataChanged`
        for changed data unless ``accept_changed``."""
        version = state.get("version")
        notes: List[str] = []
        if version == 1:
            state = upgrade_v1(state, self.identities, path_hash)
            notes.append(
                "the checkpoint's data state predates source fingerprints (state version 1): its cursors keep their "
                "path-seeded order, and changes to the data since it was saved cannot be detected"
            )
        elif version != STATE_VERSION:
            raise ValueError(f"data sampler state version {version!r} unsupported (expected 1 or {STATE_VERSION})")
        matched, foreign = match_sources(state, self.identities)
        if version == 1 and foreign and len(matched) < len(self.keys):
            lost = sorted(set(self.keys) - set(matched))
            notes.append(
                f"the version-1 checkpoint has no cursor for {', '.join(lost)} (it has {', '.join(sorted(foreign))}): "
                "a source moved since then starts over at epoch 0; keep its old path to continue it"
            )
        entries, changed = check_changes(matched, self.identities, accept_changed)
        key_of = {sid: key for key, (sid, _) in matched.items()}
        mixture = state["mixture"]
        old = {
            "weights": {key_of.get(s, s): w for s, w in mixture["weights"].items()},
            "counts": {key_of.get(s, s): c for s, c in mixture["counts"].items()},
            "total": mixture["total"],
        }
        return Resolved(entries, foreign, old, notes + changed)

    def load_resolved(self, resolved: Resolved) -> None:
        self.foreign = {sid: dict(entry) for sid, entry in resolved.foreign.items()}
        for key, entry in resolved.entries.items():
            self.samplers[key].load_state_dict(entry)
        mixture = resolved.mixture
        if _same_proportions(mixture["weights"], self.weights):
            self.counts = {k: int(mixture["counts"][k]) for k in self.keys}
            self.total = int(mixture["total"])
        else:  # new weights: proportions are enforced from here on
            self.counts = {k: 0 for k in self.keys}
            self.total = 0

    def load_state_dict(self, state: Mapping[str, Any], accept_changed: bool = False) -> List[str]:
        """Resume from ``state``; returns the notes to show (a version-1 state, data changes accepted)."""
        resolved = self.resolve_state(state, accept_changed)
        self.load_resolved(resolved)
        return resolved.notes


@dataclass
class Resolved:
    """A saved state matched to a mixture: ``entries`` by source key, ``foreign`` (unmatched) by id, the saved
    ``mixture`` counts keyed by source key where matched, and ``notes`` to show."""

    entries: Dict[str, Dict[str, Any]]
    foreign: Dict[str, Dict[str, Any]]
    mixture: Dict[str, Any]
    notes: List[str]


def _same_proportions(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    if set(a) != set(b):
        return False
    ta, tb = sum(Fraction(v) for v in a.values()), sum(Fraction(v) for v in b.values())
    return all(Fraction(a[k]) * tb == Fraction(b[k]) * ta for k in a)
