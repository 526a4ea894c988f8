"""Train loader and validation batches built from the ``data`` section of a resolved config.

``data`` is the typed section (`DataSection`, built by the config package) or any object with its attributes,
every one present (the config system fills the defaults; nothing is defaulted here): ``seq_len``, ``micro_bsz``,
``micro_num``, ``train_folder`` (a path, a list of paths with equal weights, or ``{path: weight}``),
``valid_folder`` (path or None), ``valid_ratio``, ``valid_max_samples``, ``valid_micro_num`` (None: no cap),
``block_seqs`` (shuffle block of the sampler). Keys added since (``type``, ``accept_changed_data``, ``text_key``,
``stream_workers``) take their defaults when absent, so that plain namespaces of the older keys keep working.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

from .packing import PackedSequence, collate, pack_window, padding_sequence, window_label_tokens
from .sampler import MixtureSampler
from .sources import check_window_ids
from .stream import TokenStream, source_key
from .train_sources import holdout_start, open_stream, open_token_source, unique_identities

__all__ = ["TrainLoader", "build_train_loader", "build_valid_batches", "holdout_start", "open_train_sources"]


def parse_weights(train_folder: Any) -> Dict[str, float]:
    """``train_folder`` as ``{source key: weight}``."""
    if isinstance(train_folder, str):
        return {source_key(train_folder): 1.0}
    if isinstance(train_folder, Mapping):
        weights = {source_key(str(k)): float(v) for k, v in train_folder.items()}
    elif isinstance(train_folder, (list, tuple)):
        weights = {source_key(str(k)): 1.0 for k in train_folder}
    else:
        raise ValueError(f"data.train_folder must be a path, a list of paths or {{path: weight}}, got {train_folder!r}")
    if not weights:
        raise ValueError("data.train_folder names no folder")
    return weights


def open_train_sources(data: Any) -> Tuple[List[Any], Dict[str, float]]:
    """The training sources of ``data`` (sorted by path) and their mixture weights: tokenized folders, or raw
    files tokenized on the fly when ``data.type`` is ``"streaming"`` (`internlm.data.streaming`)."""
    weights = parse_weights(data.train_folder)
    if getattr(data, "type", "tokenized") == "streaming":
        from .streaming import open_streaming_source

        sources = [open_streaming_source(key, data) for key in sorted(weights)]
        return sources, weights
    ratio = float(data.valid_ratio) if data.valid_folder is None else 0.0
    return [open_token_source(key, ratio) for key in sorted(weights)], weights


class TrainLoader:
    """This data-parallel rank's share of each global batch.

    A global batch is the next ``dp_size * micro_bsz * micro_num`` sequences of the mixture stream;
    rank ``r`` packs sequences ``[r * micro_bsz * micro_num, (r + 1) * micro_bsz * micro_num)`` into
    ``micro_num`` micro-batches of ``micro_bsz``. Every rank advances the sampler over the whole
    global batch, so all ranks hold the same ``state_dict()``.
    """

    def __init__(
        self,
        sources: List[Any],
        weights: Mapping[str, float],
        seq_len: int,
        micro_bsz: int,
        micro_num: int,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        block_seqs: int = 1024,
        accept_changed_data: bool = False,
        vocab_size: Optional[int] = None,
    ) -> None:
        sizes = {"seq_len": seq_len, "micro_bsz": micro_bsz, "micro_num": micro_num, "dp_size": dp_size}
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        self.sources = {s.key: s for s in sources}
        self.seq_len, self.micro_bsz, self.micro_num = seq_len, micro_bsz, micro_num
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.global_batch_size = dp_size * micro_bsz * micro_num
        self.sampler = MixtureSampler(
            dict(self.sources), weights, seq_len, seed, block_seqs, identities=unique_identities(sources)
        )
        self.accept_changed_data = accept_changed_data
        self.vocab_size = vocab_size  # when set, every window read is checked against it (`check_window_ids`)
        self._notes: List[str] = []  # lines for the console: resume notes, streaming throughput and waits
        self.steps = 0
        self.last_batch_source_tokens: Dict[str, int] = {k: 0 for k in self.sources}
        # label tokens (labels != IGNORE_INDEX) of the last global batch and of this rank's share of it, as
        # Python ints from document boundaries: the loss normalisation needs no tensor reduction or all-reduce
        self.last_batch_label_tokens = 0
        self.last_rank_label_tokens = 0

    def _sequence(self, key: str, epoch: int, start: int) -> PackedSequence:
        source, stop = self.sources[key], start + self.seq_len
        ends = source.doc_ends(epoch, start, stop) - start
        tokens = source.read(epoch, start, stop + 1)
        shards = getattr(getattr(source, "stream", None), "shards", None)
        if self.vocab_size is not None and shards is not None:  # streamed text: the run's tokenizer, checked at start
            check_window_ids(tokens, key, shards, self.vocab_size)
        return pack_window(tokens, ends, self.seq_len)

    def _label_tokens(self, key: str, epoch: int, start: int) -> int:
        """Label tokens of the sequence at ``start`` of source ``key``, from its document ends only (every window
        the sampler draws has its ``seq_len + 1`` tokens inside the training range)."""
        ends = self.sources[key].doc_ends(epoch, start, start + self.seq_len) - start
        return window_label_tokens(ends, self.seq_len, self.seq_len + 1)

    def next_global_batch(self) -> List[Dict[str, Any]]:
        """This rank's ``micro_num`` micro-batches of the next global batch.

        Also sets ``last_batch_label_tokens`` (label tokens of the whole global batch: every rank samples it,
        so every rank knows it without communication) and ``last_rank_label_tokens`` (this rank's share).
        """
        picks = self.sampler.next_picks(self.global_batch_size)
        self.last_batch_source_tokens = {k: 0 for k in self.sources}
        for key, _, _ in picks:
            self.last_batch_source_tokens[key] += self.seq_len
        per_rank = self.micro_bsz * self.micro_num
        mine = picks[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
        self.steps += 1
        batch = [
            collate([self._sequence(*pick) for pick in mine[m * self.micro_bsz : (m + 1) * self.micro_bsz]])
            for m in range(self.micro_num)
        ]
        self.last_rank_label_tokens = sum(mb["label_tokens"] for mb in batch)
        # the same computation over the same picks on every rank: the same value everywhere
        self.last_batch_label_tokens = sum(self._label_tokens(*pick) for pick in picks)
        for key, source in self.sources.items():  # what no later window can need (streamed sources free it)
            cursor = self.sampler.samplers[key].cursor
            source.release(cursor.epoch, cursor.block_start)
            self._notes.extend(source.messages())
        return batch

    def pop_messages(self) -> List[str]:
        """Lines for the console since the last call (resume notes, streaming throughput, data waits)."""
        out, self._notes = self._notes, []
        return out

    def __iter__(self) -> Iterator[List[Dict[str, Any]]]:
        while True:
            yield self.next_global_batch()

    def state_dict(self) -> Dict[str, Any]:
        """Per-source cursors keyed by source id (`internlm.data.sampler_state`), each with the source's fingerprint
        and, for a streamed source, its reader position; mixture counts; the number of batches taken."""
        state = self.sampler.state_dict()
        for key, source in self.sources.items():
            position = getattr(source, "position_state", None)
            if position is not None:
                state["sources"][self.sampler.identities[key].sid]["stream"] = position()
        state["steps"] = self.steps
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from ``state``; raises `DataChanged` when a source's files changed since it was saved, unless
        ``accept_changed_data``. Notes (a version-1 state, accepted changes) wait in `pop_messages`."""
        resolved = self.sampler.resolve_state(state, self.accept_changed_data)
        for key, entry in resolved.entries.items():
            restore = getattr(self.sources[key], "restore_position", None)
            if restore is not None:  # a streamed source reopens its reader where the cursor's data starts
                restore(entry.get("stream"), int(entry["epoch"]), int(entry["block_start"]))
        self.sampler.load_resolved(resolved)
        self._notes.extend(f"warning: {note}" for note in resolved.notes)
        self.steps = int(state.get("steps", 0))


def build_train_loader(
    data: Any, seed: int, dp_rank: int, dp_size: int, vocab_size: Optional[int] = None
) -> TrainLoader:
    """The trainer's entry point: open the training sources of the ``data`` section, build this rank's loader;
    ``vocab_size`` (the model's): token ids of every sequence read are checked against it."""
    sources, weights = open_train_sources(data)
    return TrainLoader(
        sources,
        weights,
        seq_len=data.seq_len,
        micro_bsz=data.micro_bsz,
        micro_num=data.micro_num,
        seed=seed,
        dp_rank=dp_rank,
        dp_size=dp_size,
        block_seqs=data.block_seqs,
        accept_changed_data=bool(getattr(data, "accept_changed_data", False)),
        vocab_size=vocab_size,
    )


def _valid_ranges(data: Any) -> List[Tuple[TokenStream, int]]:
    """``(stream, first token)`` of the data to validate on (to the stream end), in sorted path order."""
    if data.valid_folder is not None:
        return [(open_stream(k), 0) for k in sorted(parse_weights(data.valid_folder))]
    sources, _ = open_train_sources(data)
    return [(s.stream, s.train_end) for s in sources]


def _interleave(ranges: List[Tuple[TokenStream, int]], seq_len: int, limit: int) -> List[Tuple[TokenStream, int]]:
    """Round-robin over sources of the windows ``start + k L`` with ``start + (k + 1) L <= num_tokens``."""
    counts = [max((stream.num_tokens - start) // seq_len, 0) for stream, start in ranges]
    if sum(counts) == 0:
        sizes = ", ".join(f"{s.folder!r}: {s.num_tokens - a} tokens" for s, a in ranges)
        raise ValueError(
            f"no validation sequence of seq_len={seq_len} fits in the validation data ({sizes}); "
            "raise data.valid_ratio, give data.valid_folder, or set valid_ratio=0 to skip validation"
        )
    out: List[Tuple[TokenStream, int]] = []
    k = 0
    while len(out) < limit and any(c > k for c in counts):
        for (stream, start), c in zip(ranges, counts):
            if c > k and len(out) < limit:
                out.append((stream, start + k * seq_len))
        k += 1
    return out


def build_valid_batches(
    data: Any, seed: int, dp_rank: int, dp_size: int, vocab_size: Optional[int] = None
) -> List[Dict[str, Any]]:
    """This rank's validation micro-batches (empty when there is no validation data); ``vocab_size`` (the
    model's): token ids of every window read are checked against it.

    The validation sequences are consecutive windows of the held-out tail of every training source
    (or of ``valid_folder``), interleaved round-robin over sources in sorted path order; the first
    ``V = min(valid_max_samples, available, valid_micro_num * micro_bsz)`` are used. Round ``m`` holds
    sequences ``[m * dp_size * micro_bsz, (m + 1) * dp_size * micro_bsz)``, rank ``r`` packs its
    ``micro_bsz`` slice; slots past ``V`` are padding with every label ``-100``. The union over ranks is
    thus the same ``V`` sequences for any ``dp_size``, and every rank gets ``ceil(V / (dp_size * micro_bsz))``
    micro-batches. Validation is not shuffled, so ``seed`` does not change it.
    """
    del seed  # validation order is fixed; the argument mirrors build_train_loader
    seq_len, micro_bsz = data.seq_len, data.micro_bsz
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
    limit = data.valid_max_samples
    if data.valid_micro_num is not None:
        limit = min(limit, data.valid_micro_num * micro_bsz)
    if data.valid_folder is None and not data.valid_ratio:
        return []
    if data.valid_folder is None and getattr(data, "type", "tokenized") == "streaming":
        raise ValueError(
            f"valid_ratio={data.valid_ratio} holds out the end of each source, which a streamed source has only once "
            "read to the end; set data.valid_ratio=0 or data.valid_folder (a tokenized folder)"
        )
    windows = _interleave(_valid_ranges(data), seq_len, limit)
    rounds = math.ceil(len(windows) / (dp_size * micro_bsz))
    batches = []
    for m in range(rounds):
        base = m * dp_size * micro_bsz + dp_rank * micro_bsz
        seqs = []
        for g in range(base, base + micro_bsz):
            if g >= len(windows):
                seqs.append(padding_sequence(seq_len))
                continue
            stream, start = windows[g]
            stop = start + seq_len
            tokens = stream.read(start, min(stop + 1, stream.num_tokens))
            if vocab_size is not None:
                check_window_ids(tokens, stream.folder, stream.shards, vocab_size)
            seqs.append(pack_window(tokens, stream.doc_ends(start, stop) - start, seq_len))
        batches.append(collate(seqs))
    return batches
