"""Layout-independent optimizer state: full fp32 tensors per parameter name, merged from ZeRO shards.

A *full state* is what every layout agrees on::

    {
      "format": "internlm.hybrid_zero.full.v1",
      "num_updates": AdamW steps applied, "skipped_steps": steps skipped on inf/nan,
      "lr": float, "betas": (beta1, beta2),
      "params": {name: {"master": fp32 tensor of the global shape,
                        "exp_avg", "exp_avg_sq": fp32 tensors of the global shape, or None before the first update}},
    }

`merge_shard_states` builds it from the shards of one data-parallel replica (see `shard_state.py` for the
shard format); `cut_full_state` cuts it for the current layout into the `StateValues` the optimizer installs.
With ``f`` a parameter's full tensor, its tensor-parallel shard ``(dim, r, T)`` and its buffer range ``[a, e)``,
a rank whose zero1 slice is ``[s0, s1)`` holds, for every buffer element ``i`` in ``[max(a, s0), min(e, s1))``::

    master[i - s0] = flatten(chunk(f, T, dim)[r])[i - a]         (the same for exp_avg, exp_avg_sq)

Merging inverts this: the slices of every zero1 rank tile each local tensor, and the tensor ranks'
local tensors are concatenated along ``dim`` (replicated tensors are taken from the lowest tensor rank).
Both directions go through the parameter's `TPShard` (``TPShard.from_record`` of the saved ``(dim, r, T)``
when merging, the slot's own shard when cutting): ``join`` concatenates, ``slice`` cuts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from internlm.parallel.tp_shard import TPShard

from .flat_buffer import FlatBuffer
from .shard_state import FORMAT, StateValues

FULL_FORMAT = "internlm.hybrid_zero.full.v1"
STATE_KEYS = ("master", "exp_avg", "exp_avg_sq")
_COUNTERS = ("num_updates", "skipped_steps")


@dataclass
class _LocalTensor:
    """One tensor rank's local tensor of one parameter, being stitched from zero1 slices."""

    shard: TPShard
    values: Dict[str, Optional[torch.Tensor]]  # flat, per STATE_KEYS
    covered: List[Tuple[int, int]] = field(default_factory=list)  # filled element ranges (local coordinates)
    sources: List[str] = field(default_factory=list)


def _coverage_problem(covered: List[Tuple[int, int]], numel: int) -> Optional[str]:
    """None if the ranges tile [0, numel) exactly, else what is wrong."""
    position = 0
    for start, end in sorted(covered):
        if start < position:
            return f"elements [{start}, {min(end, position)}) come from two shards"
        if start > position:
            return f"elements [{position}, {start}) are in no shard"
        position = end
    if position != numel:
        return f"elements [{position}, {numel}) are in no shard"
    return None


def merge_shard_states(
    shards: Iterable[Tuple[str, Mapping[str, Any]]], names: Optional[Iterable[str]] = None
) -> Dict[str, Any]:
    """The full state from the shards of one data-parallel replica: every (tensor rank, pipeline stage,
    zero1 rank) exactly once, given as ``(label, shard)`` pairs (the label, e.g. a file name, names the
    shard in errors). ``names`` restricts the result to those parameters (default: all).

    Raises ValueError naming the shard and parameter when shards disagree (counters, shapes, tensor-parallel
    split), overlap, or leave elements or tensor ranks uncovered.
    """
    wanted = set(names) if names is not None else None
    pieces: Dict[str, Dict[int, _LocalTensor]] = {}
    counters: Optional[Dict[str, Any]] = None
    hyper: Dict[str, Any] = {}
    first_label = ""
    for label, shard in shards:
        if shard.get("format") != FORMAT:
            raise ValueError(f"{label}: not a hybrid ZeRO optimizer shard (format {shard.get('format')!r})")
        mine = {k: shard[k] for k in _COUNTERS}
        mine["has_moments"] = all(b["exp_avg"] is not None for b in shard["buffers"])
        if counters is None:
            counters, first_label = mine, label
            hyper = {"lr": shard["lr"], "betas": tuple(shard["betas"])}
        elif mine != counters:
            raise ValueError(
                f"{label}: counters {mine} differ from {counters} of {first_label}; the shards are "
                f"not from one checkpoint"
            )
        tp_rank = int(shard["tp_rank"])
        for buffer in shard["buffers"]:
            _take_buffer(label, tp_rank, buffer, mine["has_moments"], wanted, pieces)
    if counters is None:
        raise ValueError("no optimizer shards to merge")

    params: Dict[str, Dict[str, Optional[torch.Tensor]]] = {}
    for name, per_rank in pieces.items():
        params[name] = _join_tensor_ranks(name, per_rank)
    if wanted is not None and wanted - set(params):
        missing = sorted(wanted - set(params))
        raise ValueError(
            f"parameters not in any optimizer shard: {', '.join(missing[:8])}"
            + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
        )
    return {
        "format": FULL_FORMAT,
        "num_updates": int(counters["num_updates"]),
        "skipped_steps": int(counters["skipped_steps"]),
        **hyper,
        "params": params,
    }


def _take_buffer(
    label: str,
    tp_rank: int,
    buffer: Mapping[str, Any],
    has_moments: bool,
    wanted: Optional[set],
    pieces: Dict[str, Dict[int, _LocalTensor]],
) -> None:
    """Copy this shard's owned slice of each parameter of ``buffer`` into the parameter's local tensor."""
    shard_start, _ = buffer["shard_range"]
    for meta in buffer["params"]:
        name = meta["name"]
        if wanted is not None and name not in wanted:
            continue
        start, end = meta["range"]
        shard = TPShard.from_record(meta["shape"], meta["tp_shard"])
        if list(shard.global_shape) != list(meta["global_shape"]):
            raise ValueError(
                f"{label}: parameter {name} (tensor rank {tp_rank}) has global shape "
                f"{list(meta['global_shape'])}, but shape {list(meta['shape'])} with tp_shard "
                f"{shard.to_record()} gives {list(shard.global_shape)}"
            )
        local = pieces.setdefault(name, {}).get(tp_rank)
        if local is None:
            local = _LocalTensor(
                shard=shard,
                values={
                    k: torch.zeros(end - start, dtype=torch.float32) if k == "master" or has_moments else None
                    for k in STATE_KEYS
                },
            )
            pieces[name][tp_rank] = local
        elif local.shard != shard:
            raise ValueError(
                f"{label}: parameter {name} (tensor rank {tp_rank}) has shape {list(meta['shape'])} / "
                f"tp_shard {shard.to_record()}, but {local.sources[0]} has "
                f"{list(local.shard.local_shape)} / {local.shard.to_record()}"
            )
        owned_start, owned_end = meta["owned_range"]
        local.sources.append(label)
        if owned_end <= owned_start:
            continue
        local.covered.append((owned_start - start, owned_end - start))
        for key in STATE_KEYS:
            if local.values[key] is not None:
                source = buffer[key][owned_start - shard_start : owned_end - shard_start]
                local.values[key][owned_start - start : owned_end - start] = source.float()


def _join_tensor_ranks(name: str, per_rank: Dict[int, _LocalTensor]) -> Dict[str, Optional[torch.Tensor]]:
    """Full tensors of one parameter from its tensor ranks' local tensors."""
    for tp_rank, local in per_rank.items():
        problem = _coverage_problem(local.covered, len(local.values["master"]))
        if problem:
            raise ValueError(
                f"parameter {name} (tensor rank {tp_rank}): {problem} (shards read: "
                f"{', '.join(sorted(set(local.sources)))}); is an optimizer file missing?"
            )
    lowest = per_rank[min(per_rank)]
    shard = lowest.shard
    if not shard.is_split:  # replicated over the tensor group: every rank holds the same values
        return {k: (v.view(shard.local_shape) if v is not None else None) for k, v in lowest.values.items()}
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
    out: Dict[str, Optional[torch.Tensor]] = {}
    for key in STATE_KEYS:
        if lowest.values[key] is None:
            out[key] = None
            continue
        out[key] = shard.join([per_rank[r].values[key].view(shard.local_shape) for r in range(shard.size)])
    return out


@torch.no_grad()
def cut_full_state(full: Mapping[str, Any], buffers: Sequence[FlatBuffer]) -> StateValues:
    """This rank's owned slices (master, exp_avg, exp_avg_sq) of every buffer from a full state, with its
    counters, lr and betas. Padding stays zero. Raises ValueError naming the parameter when it is missing
    or its global shape differs."""
    if full.get("format") != FULL_FORMAT:
        raise ValueError(
            f"not a full optimizer state: format {full.get('format')!r}, expected {FULL_FORMAT!r} "
            f"(see merge_optimizer_checkpoint)"
        )
    params = full["params"]
    has_moments: Optional[bool] = None
    slices: List[Dict[str, torch.Tensor]] = []
    for buffer in buffers:
        device = buffer.grads.device
        values = {k: torch.zeros(buffer.shard_numel, dtype=torch.float32, device=device) for k in STATE_KEYS}
        for slot in buffer.slots:
            entry = params.get(slot.name)
            if entry is None:
                raise ValueError(
                    f"parameter {slot.name} (chunk {buffer.key.chunk}) is not in the full optimizer "
                    f"state; it was saved for another model"
                )
            expected = list(slot.shard.global_shape)
            if list(entry["master"].shape) != expected:
                raise ValueError(
                    f"parameter {slot.name}: full optimizer state has shape "
                    f"{list(entry['master'].shape)}, this model needs {expected}"
                )
            present = entry["exp_avg"] is not None
            if has_moments is not None and present != has_moments:
                raise ValueError(f"parameter {slot.name}: Adam moments present for some parameters only")
            has_moments = present
            owned_start, owned_end = buffer.owned_range(slot)
            if owned_end <= owned_start:
                continue
            dst = slice(owned_start - buffer.shard_start, owned_end - buffer.shard_start)
            src = slice(owned_start - slot.start, owned_end - slot.start)
            for key in STATE_KEYS:
                if entry[key] is not None:
                    local = slot.shard.slice(entry[key]).reshape(-1)
                    values[key][dst] = local[src].to(device=device, dtype=torch.float32)
        slices.append(values)
    return StateValues(
        masters=[v["master"] for v in slices],
        moments=[(v["exp_avg"], v["exp_avg_sq"]) for v in slices] if has_moments else None,
        num_updates=int(full["num_updates"]),
        skipped_steps=int(full["skipped_steps"]),
        lr=full["lr"],
        betas=tuple(full["betas"]),
    )


__all__ = ["FULL_FORMAT", "STATE_KEYS", "merge_shard_states", "cut_full_state"]
