"""Deterministic mixture sampling of packed sequences, resumable per source path.

Every source (data folder) is one token stream whose training range is ``[0, train_end)``. A
sequence of length ``L`` starting at token ``t`` needs ``t + L + 1 <= train_end`` (the extra token is
the last label).

**Within a source** sequences are drawn block by block. A block starts at token ``b`` and holds
``n = min(block_seqs, (train_end - 1 - b) // L)`` consecutive windows ``b, b + L, ..., b + (n-1) L``;
they are visited in the order of a permutation seeded by ``(seed, sha256(path), epoch, b)``. The next
block starts at ``b + n L``. When no window fits, the source wraps: ``epoch += 1`` and ``b = 0``.

**Across sources** the ``k``-th sequence of the run (k = 0, 1, ...) comes from the source ``i``
maximising ``(k + 1) * w_i / sum(w) - c_i`` (``c_i``: sequences already taken from it under the
current weights; ties go to the smallest path). This largest-deficit rule, evaluated in exact rational
arithmetic, keeps ``|c_i - k * w_i / sum(w)|`` bounded for every prefix, whatever ``k``: below 1/2 for
two sources, below about one sequence for a handful.

The sequence stream therefore depends only on the seed, the data and the weights; a global batch of
``G`` sequences is the next ``G`` of them, whatever the number of processes.

**State** (``state_dict``) holds one cursor per source path ``(epoch, b, n, L, seed, taken)``. A
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
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

STATE_VERSION = 1


def path_hash(key: str) -> int:
    """A 64-bit integer from the source path, stable across processes and Python versions."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")


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


class SourceSampler:
    """Yields start offsets of sequences of one source, block-shuffled, wrapping at epoch ends."""

    def __init__(self, key: str, train_end: int, seq_len: int, seed: int, block_seqs: int = 1024) -> None:
        if train_end < seq_len + 1:
            raise ValueError(
                f"source {key!r} has {train_end} training tokens, fewer than one sequence needs "
                f"(seq_len + 1 = {seq_len + 1}); add data, lower seq_len or lower valid_ratio"
            )
        if block_seqs < 1:
            raise ValueError(f"block_seqs must be >= 1, got {block_seqs}")
        self.key, self.train_end, self.seq_len, self.seed, self.block_seqs = key, train_end, seq_len, seed, block_seqs
        self._hash = path_hash(key)
        self.cursor = Cursor(seq_len=seq_len, seed=seed)
        self._open_block(0, 0)

    def _windows_from(self, start: int) -> int:
        return max((self.train_end - 1 - start) // self.seq_len, 0)

    def _open_block(self, epoch: int, start: int) -> None:
        if self._windows_from(start) == 0:
            epoch, start = epoch + 1, 0
        c = self.cursor
        c.epoch, c.block_start, c.taken = epoch, start, 0
        c.block_len = min(self.block_seqs, self._windows_from(start))
        c.seq_len, c.seed = self.seq_len, self.seed
        self._perm: Optional[np.ndarray] = None

    def _permutation(self) -> np.ndarray:
        if self._perm is None:
            c = self.cursor
            rng = np.random.default_rng([self.seed, self._hash, c.epoch, c.block_start])
            self._perm = rng.permutation(c.block_len)
        return self._perm

    def next_start(self) -> int:
        """Token offset of the next sequence; advances the cursor."""
        c = self.cursor
        if c.taken == c.block_len:
            self._open_block(c.epoch, c.block_start + c.block_len * c.seq_len)
        start = c.block_start + int(self._permutation()[c.taken]) * self.seq_len
        c.taken += 1
        c.sequences_total += 1
        c.tokens_total += self.seq_len
        return start

    def state_dict(self) -> Dict[str, int]:
        return asdict(self.cursor)

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume exactly when compatible, else continue at the next block boundary (module docstring)."""
        old = Cursor(**{k: int(v) for k, v in state.items()})
        compatible = (
            old.seq_len == self.seq_len
            and old.seed == self.seed
            and old.block_len == min(self.block_seqs, self._windows_from(old.block_start))
            and old.block_len > 0
        )
        if compatible:
            self.cursor = old
            self._perm = None
            return
        self.cursor.sequences_total, self.cursor.tokens_total = old.sequences_total, old.tokens_total
        resume_at = old.block_start + (old.block_len * old.seq_len if old.taken > 0 else 0)
        self._open_block(old.epoch, resume_at)


class MixtureSampler:
    """The global sequence stream over weighted sources: a list of ``(source key, start)`` per batch."""

    def __init__(
        self,
        train_ends: Mapping[str, int],
        weights: Mapping[str, float],
        seq_len: int,
        seed: int,
        block_seqs: int = 1024,
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
        self.keys: List[str] = sorted(weights)  # sorted: independent of the config's dict order
        self.weights = {k: float(weights[k]) for k in self.keys}
        self._w = [Fraction(self.weights[k]) for k in self.keys]
        self._w_total = sum(self._w)
        self.samplers = {k: SourceSampler(k, int(train_ends[k]), seq_len, seed, block_seqs) for k in self.keys}
        self.counts = {k: 0 for k in self.keys}
        self.total = 0
        self._foreign: Dict[str, Dict[str, int]] = {}  # cursors of sources not in this mixture

    def _pick(self) -> str:
        # argmax_i (k + 1) w_i / W - c_i, compared exactly as (k + 1) w_i - c_i W
        k1 = self.total + 1
        best, best_score = self.keys[0], None
        for key, w in zip(self.keys, self._w):
            score = k1 * w - self.counts[key] * self._w_total
            if best_score is None or score > best_score:
                best, best_score = key, score
        return best

    def next_sequences(self, count: int) -> List[Tuple[str, int]]:
        """The next ``count`` sequences of the stream as ``(source key, start token)``."""
        out = []
        for _ in range(count):
            key = self._pick()
            self.counts[key] += 1
            self.total += 1
            out.append((key, self.samplers[key].next_start()))
        return out

    def state_dict(self) -> Dict[str, Any]:
        sources = dict(self._foreign)
        sources.update({k: s.state_dict() for k, s in self.samplers.items()})
        return {
            "version": STATE_VERSION,
            "sources": sources,
            "mixture": {"weights": dict(self.weights), "counts": dict(self.counts), "total": self.total},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"data sampler state version {state.get('version')!r} unsupported (expected {STATE_VERSION})"
            )
        self._foreign = {}
        for key, cursor in state["sources"].items():
            if key in self.samplers:
                self.samplers[key].load_state_dict(cursor)
            else:
                self._foreign[key] = dict(cursor)
        mixture = state["mixture"]
        if _same_proportions(mixture["weights"], self.weights):
            self.counts = {k: int(mixture["counts"][k]) for k in self.keys}
            self.total = int(mixture["total"])
        else:  # new weights: proportions are enforced from here on
            self.counts = {k: 0 for k in self.keys}
            self.total = 0


def _same_proportions(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    if set(a) != set(b):
        return False
    ta, tb = sum(Fraction(v) for v in a.values()), sum(Fraction(v) for v in b.values())
    return all(Fraction(a[k]) * tb == Fraction(b[k]) * ta for k in a)
