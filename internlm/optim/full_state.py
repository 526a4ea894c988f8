"""Layout-independent optimizer state: full fp32 tensors per parameter name, merged from ZeRO shards.

A *full state* is what every layout agrees on::

    {
      "format": "internlm.hybrid_zero.full.v1",
      "num_updates": AdamW steps applied, "skipped_steps": steps skipped on inf/nan,
      "lr": float, "betas": (beta1, beta2), "grad_scaler": the fp16 loss scaler's state or None,
      "params": {name: {"master": fp32 tensor of the global shape,
                        "exp_avg", "exp_avg_sq": fp32 tensors of the global shape, or None before the first update}},
    }

With ``f`` a parameter's full tensor, its tensor-parallel shard ``(dim, r, T)`` and its buffer range ``[a, e)``,
a rank whose zero1 slice is ``[s0, s1)`` holds, for every buffer element ``i`` in ``[max(a, s0), min(e, s1))``::

    master[i - s0] = flatten(chunk(f, T, dim)[r])[i - a]         (the same for exp_avg, exp_avg_sq)

Two ways to use it:

* `ShardedFullState` (what resharding uses) is the full state *without materialising it*: an index of where
  each parameter's elements lie in the saved shards of one data-parallel replica, whose tensors stay where they
  are (memory-mapped checkpoint files). `cut_full_state` copies each owned slice straight from those shards
  into this rank's optimizer tensors with `copy_overlap`: no full tensor, not even one parameter's, is built.
* `merge_shard_states` builds the dict above (the whole model's fp32 state in memory: an export tool).

`copy_overlap` does the index arithmetic for both: the two sides are flat element ranges of two tensor shards
(`TPShard`) of one full tensor, split along the same dimension (or replicated); per row of the tensor viewed as
``(prod(shape[:dim]), shape[dim] * prod(shape[dim+1:]))`` their common elements are one contiguous run, so
the copy is at most nine strided block copies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from internlm.parallel.tp_shard import TPShard

from .flat_buffer import FlatBuffer
from .shard_state import FORMAT, StateValues

FULL_FORMAT = "internlm.hybrid_zero.full.v1"
STATE_KEYS = ("master", "exp_avg", "exp_avg_sq")
_COUNTERS = ("num_updates", "skipped_steps")


# ---------------------------------------------------------------------- index arithmetic
def _row_runs(start: int, end: int, width: int) -> List[Tuple[int, int, int, int]]:
    """Flat elements ``[start, end)`` of a row-major ``(rows, width)`` matrix as runs ``(r0, r1, c0, c1)``:
    rows ``[r0, r1)``, each covering columns ``[c0, c1)`` (a partial first row, full rows, a partial last row)."""
    if end <= start:
        return []
    r_start, c_start = divmod(start, width)
    r_end, c_end = divmod(end, width)
    if r_start == r_end:
        return [(r_start, r_start + 1, c_start, c_end)]
    runs = []
    if c_start:
        runs.append((r_start, r_start + 1, c_start, width))
        r_start += 1
    if r_end > r_start:
        runs.append((r_start, r_end, 0, width))
    if c_end:
        runs.append((r_end, r_end + 1, 0, c_end))
    return runs


def _span(shard: TPShard, dim: int, shape: Sequence[int]) -> Tuple[int, int]:
    """Index range of ``shard``'s local tensor along ``dim`` of the full tensor."""
    if not shard.is_split:
        return 0, shape[dim]
    local = shape[dim] // shard.size
    return shard.rank * local, (shard.rank + 1) * local


@torch.no_grad()
def copy_overlap(
    dst: torch.Tensor, dst_shard: TPShard, dst_start: int, src: torch.Tensor, src_shard: TPShard, src_start: int
) -> int:
    """Copy the elements two flat pieces of one full tensor have in common; returns how many were copied.

    ``dst`` holds flat elements ``[dst_start, dst_start + dst.numel())`` of ``dst_shard``'s local tensor
    (row-major), ``src`` flat elements ``[src_start, ...)`` of ``src_shard``'s; both are 1-D and contiguous
    (``src`` is made so if it is not). The shards must describe the same full shape and split along the same
    dimension when both are split. Nothing is allocated beyond views: values go straight from ``src`` into
    ``dst`` (with a dtype conversion if they differ).
    """
    if tuple(dst_shard.global_shape) != tuple(src_shard.global_shape):
        raise ValueError(
            f"full shapes differ: {list(dst_shard.global_shape)} (destination) vs {list(src_shard.global_shape)}"
        )
    dims = {s.dim for s in (dst_shard, src_shard) if s.is_split}
    if len(dims) > 1:
        raise ValueError(f"tensor shards split along different dimensions {sorted(dims)}")
    shape = list(dst_shard.global_shape) or [1]
    dim = dims.pop() if dims else 0
    inner = math.prod(shape[dim + 1 :])
    d0, d1 = _span(dst_shard, dim, shape)
    s0, s1 = _span(src_shard, dim, shape)
    dst_width, src_width = (d1 - d0) * inner, (s1 - s0) * inner
    if src.dim() != 1 or (src.numel() > 1 and src.stride(0) != 1):
        src = src.reshape(-1).contiguous()
    if dst.dim() != 1 or (dst.numel() > 1 and dst.stride(0) != 1):
        raise ValueError("copy_overlap needs a 1-D contiguous destination")
    copied = 0
    for sr0, sr1, sc0, sc1 in _row_runs(src_start, src_start + src.numel(), src_width):
        for dr0, dr1, dc0, dc1 in _row_runs(dst_start, dst_start + dst.numel(), dst_width):
            r0, r1 = max(sr0, dr0), min(sr1, dr1)
            g0, g1 = max(s0 * inner + sc0, d0 * inner + dc0), min(s0 * inner + sc1, d0 * inner + dc1)
            if r0 >= r1 or g0 >= g1:
                continue
            rows, cols = r1 - r0, g1 - g0
            src_at = r0 * src_width + (g0 - s0 * inner) - src_start
            dst_at = r0 * dst_width + (g0 - d0 * inner) - dst_start
            src_view = src.as_strided((rows, cols), (src_width, 1), src.storage_offset() + src_at)
            dst_view = dst.as_strided((rows, cols), (dst_width, 1), dst.storage_offset() + dst_at)
            dst_view.copy_(src_view)
            copied += rows * cols
    return copied


# ---------------------------------------------------------------------- the lazy full state
@dataclass
class _Piece:
    """One zero1 rank's owned part of one tensor rank's local tensor: local flat elements ``[start, end)``,
    at ``offset`` in the saved buffer's ``master`` / ``exp_avg`` / ``exp_avg_sq``."""

    label: str
    buffer: Mapping[str, Any]
    start: int
    end: int
    offset: int

    def values(self, key: str) -> torch.Tensor:
        return self.buffer[key][self.offset : self.offset + self.end - self.start]


@dataclass
class _LocalTensor:
    """What the shards hold of one tensor rank's local tensor of one parameter."""

    shard: TPShard
    pieces: List[_Piece] = field(default_factory=list)
    sources: List[str] = field(default_factory=list)


class ShardedFullState:
    """The full state of one data-parallel replica's shards (every tensor rank, pipeline stage and zero1 rank
    once, as ``(label, shard)`` pairs), as an index: no tensor is copied until `cut_full_state` (or
    `full_tensor`) asks for a parameter's values, which are then read from the shards' own tensors (for
    memory-mapped files: only the pages that hold them).

    ``names`` restricts the index to those parameters. Raises ValueError naming the shard and parameter when
    shards disagree (format, counters, shapes, tensor-parallel split).
    """

    def __init__(self, shards: Iterable[Tuple[str, Mapping[str, Any]]], names: Optional[Iterable[str]] = None):
        wanted = set(names) if names is not None else None
        self._index: Dict[str, Dict[int, _LocalTensor]] = {}
        counters: Optional[Dict[str, Any]] = None
        first_label = ""
        for label, shard in shards:
            if shard.get("format") != FORMAT:
                raise ValueError(f"{label}: not a hybrid ZeRO optimizer shard (format {shard.get('format')!r})")
            mine = {k: shard[k] for k in _COUNTERS}
            mine["has_moments"] = all(b["exp_avg"] is not None for b in shard["buffers"])
            if counters is None:
                counters, first_label = mine, label
                self.lr, self.betas = shard["lr"], tuple(shard["betas"])
                self.grad_scaler = shard.get("grad_scaler")  # fp16 loss scale, the same in every shard
            elif mine != counters:
                raise ValueError(
                    f"{label}: counters {mine} differ from {counters} of {first_label}; the shards are "
                    f"not from one checkpoint"
                )
            for buffer in shard["buffers"]:
                self._take_buffer(label, int(shard["tp_rank"]), buffer, wanted)
        if counters is None:
            raise ValueError("no optimizer shards to merge")
        self.num_updates = int(counters["num_updates"])
        self.skipped_steps = int(counters["skipped_steps"])
        self.has_moments = bool(counters["has_moments"])
        if wanted is not None and wanted - set(self._index):
            missing = sorted(wanted - set(self._index))
            raise ValueError(
                f"parameters not in any optimizer shard: {', '.join(missing[:8])}"
                + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
            )

    def _take_buffer(self, label: str, tp_rank: int, buffer: Mapping[str, Any], wanted: Optional[set]) -> None:
        shard_start, _ = buffer["shard_range"]
        for meta in buffer["params"]:
            name = meta["name"]
            if wanted is not None and name not in wanted:
                continue
            start, _ = meta["range"]
            shard = TPShard.from_record(meta["shape"], meta["tp_shard"])
            if list(shard.global_shape) != list(meta["global_shape"]):
                raise ValueError(
                    f"{label}: parameter {name} (tensor rank {tp_rank}) has global shape "
                    f"{list(meta['global_shape'])}, but shape {list(meta['shape'])} with tp_shard "
                    f"{shard.to_record()} gives {list(shard.global_shape)}"
                )
            local = self._index.setdefault(name, {}).get(tp_rank)
            if local is None:
                local = self._index[name][tp_rank] = _LocalTensor(shard)
            elif local.shard != shard:
                raise ValueError(
                    f"{label}: parameter {name} (tensor rank {tp_rank}) has shape {list(meta['shape'])} / "
                    f"tp_shard {shard.to_record()}, but {local.sources[0]} has "
                    f"{list(local.shard.local_shape)} / {local.shard.to_record()}"
                )
            local.sources.append(label)
            owned_start, owned_end = meta["owned_range"]
            if owned_end > owned_start:
                local.pieces.append(
                    _Piece(label, buffer, owned_start - start, owned_end - start, owned_start - shard_start)
                )

    # ------------------------------------------------------------------ queries
    def names(self) -> List[str]:
        return list(self._index)

    def global_shape(self, name: str) -> Optional[Tuple[int, ...]]:
        per_rank = self._index.get(name)
        return None if per_rank is None else tuple(per_rank[min(per_rank)].shard.global_shape)

    def _ranks(self, name: str) -> List[_LocalTensor]:
        """The local tensors that together hold the full tensor once: every rank of a split, else the lowest."""
        per_rank = self._index[name]
        lowest = per_rank[min(per_rank)]
        shard = lowest.shard
        if not shard.is_split:
            return [lowest]
        if sorted(per_rank) != list(range(shard.size)):
            raise ValueError(
                f"parameter {name}: split into {shard.size} tensor shards but found tensor ranks {sorted(per_rank)}"
            )
        for tp_rank, local in per_rank.items():
            expected = TPShard.split(shard.global_shape, shard.dim, tp_rank, shard.size)
            if local.shard != expected:
                raise ValueError(
                    f"parameter {name}: tensor rank {tp_rank} holds tp_shard {local.shard.to_record()} "
                    f"of global shape {list(local.shard.global_shape)}, expected "
                    f"{expected.to_record()} of {list(expected.global_shape)}"
                )
        return [per_rank[r] for r in range(shard.size)]

    def sources(self, name: str, key: str) -> List[Tuple[torch.Tensor, TPShard, int]]:
        """``(values, shard, start)`` pieces that hold parameter ``name``'s ``key`` once (views, no copies)."""
        return [(piece.values(key), local.shard, piece.start) for local in self._ranks(name) for piece in local.pieces]

    def labels(self, name: str) -> List[str]:
        return sorted({label for local in self._index[name].values() for label in local.sources})

    @torch.no_grad()
    def full_tensor(self, name: str, key: str) -> torch.Tensor:
        """Parameter ``name``'s full fp32 ``key`` tensor (materialised; raises when elements are missing)."""
        shape = self.global_shape(name)
        out = torch.zeros(math.prod(shape), dtype=torch.float32)
        full = TPShard.replicated(shape)
        copied = sum(
            copy_overlap(out, full, 0, values, shard, start) for values, shard, start in self.sources(name, key)
        )
        _check_copied(name, copied, out.numel(), self.labels(name))
        return out.view(shape)


def _check_copied(name: str, copied: int, expected: int, labels: Sequence[str]) -> None:
    if copied != expected:
        what = "are in no shard" if copied < expected else "come from two shards"
        raise ValueError(
            f"parameter {name}: {abs(expected - copied)} of {expected} elements {what} (shards read: "
            f"{', '.join(labels)}); is an optimizer file missing?"
        )


def merge_shard_states(
    shards: Iterable[Tuple[str, Mapping[str, Any]]], names: Optional[Iterable[str]] = None
) -> Dict[str, Any]:
    """The full state (module docstring) from the shards of one data-parallel replica, materialised: every
    (tensor rank, pipeline stage, zero1 rank) exactly once, given as ``(label, shard)`` pairs (the label, e.g. a
    file name, names the shard in errors). ``names`` restricts the result to those parameters (default: all).

    Raises ValueError naming the shard and parameter when shards disagree (counters, shapes, tensor-parallel
    split), overlap, or leave elements or tensor ranks uncovered.
    """
    state = ShardedFullState(shards, names)
    params: Dict[str, Dict[str, Optional[torch.Tensor]]] = {}
    for name in state.names():
        params[name] = {
            key: state.full_tensor(name, key) if key == "master" or state.has_moments else None for key in STATE_KEYS
        }
    return {
        "format": FULL_FORMAT,
        "num_updates": state.num_updates,
        "skipped_steps": state.skipped_steps,
        "lr": state.lr,
        "betas": state.betas,
        "grad_scaler": state.grad_scaler,
        "params": params,
    }


# ---------------------------------------------------------------------- cutting
class _DictState:
    """A materialised full state (dict) with `ShardedFullState`'s query methods."""

    def __init__(self, full: Mapping[str, Any]) -> None:
        if full.get("format") != FULL_FORMAT:
            raise ValueError(
                f"not a full optimizer state: format {full.get('format')!r}, expected {FULL_FORMAT!r} "
                f"(see merge_optimizer_checkpoint)"
            )
        self.params = full["params"]
        self.num_updates, self.skipped_steps = int(full["num_updates"]), int(full["skipped_steps"])
        self.lr, self.betas = full["lr"], tuple(full["betas"])
        present = {entry["exp_avg"] is not None for entry in self.params.values()}
        if len(present) > 1:
            raise ValueError("Adam moments present for some parameters only")
        self.has_moments = present == {True}

    def global_shape(self, name: str) -> Optional[Tuple[int, ...]]:
        entry = self.params.get(name)
        return None if entry is None else tuple(entry["master"].shape)

    def sources(self, name: str, key: str) -> List[Tuple[torch.Tensor, TPShard, int]]:
        tensor = self.params[name][key]
        return [(tensor.reshape(-1), TPShard.replicated(tensor.shape), 0)]

    def labels(self, name: str) -> List[str]:
        return ["the full state"]


@torch.no_grad()
def cut_full_state(
    full: Union[Mapping[str, Any], ShardedFullState],
    buffers: Sequence[FlatBuffer],
    masters: Optional[Sequence[torch.Tensor]] = None,
) -> StateValues:
    """This rank's owned slices (master, exp_avg, exp_avg_sq) of every buffer from a full state (a dict as
    `merge_shard_states` returns, or a `ShardedFullState`), with its counters, lr and betas. Padding is zero.

    ``masters``: the optimizer's own fp32 master slices (one per buffer), written in place instead of
    allocating new ones; the moments are always new tensors. Every parameter is checked (present, same global
    shape) before anything is written: raises ValueError naming the parameter.
    """
    state = full if isinstance(full, ShardedFullState) else _DictState(full)
    for buffer in buffers:
        for slot in buffer.slots:
            shape = state.global_shape(slot.name)
            if shape is None:
                raise ValueError(
                    f"parameter {slot.name} (chunk {buffer.key.chunk}) is not in the full optimizer "
                    f"state; it was saved for another model"
                )
            if list(shape) != list(slot.shard.global_shape):
                raise ValueError(
                    f"parameter {slot.name}: full optimizer state has shape {list(shape)}, this model needs "
                    f"{list(slot.shard.global_shape)}"
                )
    keys = STATE_KEYS if state.has_moments else STATE_KEYS[:1]
    slices: List[Dict[str, torch.Tensor]] = []
    for index, buffer in enumerate(buffers):
        device = buffer.grads.device
        values: Dict[str, torch.Tensor] = {}
        for key in keys:
            if key == "master" and masters is not None:
                values[key] = masters[index]
                values[key].zero_()
            else:
                values[key] = torch.zeros(buffer.shard_numel, dtype=torch.float32, device=device)
        for slot in buffer.slots:
            owned_start, owned_end = buffer.owned_range(slot)
            if owned_end <= owned_start:
                continue
            window = slice(owned_start - buffer.shard_start, owned_end - buffer.shard_start)
            for key in keys:
                dst = values[key][window]
                copied = sum(
                    copy_overlap(dst, slot.shard, owned_start - slot.start, src, shard, start)
                    for src, shard, start in state.sources(slot.name, key)
                )
                _check_copied(slot.name, copied, dst.numel(), state.labels(slot.name))
        slices.append(values)
    return StateValues(
        masters=[v["master"] for v in slices],
        moments=[(v["exp_avg"], v["exp_avg_sq"]) for v in slices] if state.has_moments else None,
        num_updates=state.num_updates,
        skipped_steps=state.skipped_steps,
        lr=state.lr,
        betas=tuple(state.betas),
    )


__all__ = ["FULL_FORMAT", "STATE_KEYS", "ShardedFullState", "copy_overlap", "merge_shard_states", "cut_full_state"]
