"""Checkpoint format of one rank's optimizer shard, with the layout metadata needed to reshard it.

``shard_state(ranks, buffers, values)`` returns::

    {
      "format": "internlm.hybrid_zero.v1",
      "zero1_size", "zero1_rank", "dp_size", "dp_rank", "tp_size", "tp_rank", "pp_size": ints,
      "num_updates": AdamW steps applied, "skipped_steps": steps skipped on inf/nan,
      "lr": float, "betas": (beta1, beta2),
      "buffers": [            # one per flat buffer, in construction order
        {
          "key": {"chunk", "dtype", "decay", "tp_duplicate", "tp_partial_grad"},
          "numel", "padded_numel": element counts of the buffer,
          "shard_range": (start, end) of this rank's slice in the buffer,
          "master", "exp_avg", "exp_avg_sq": fp32 tensors of the slice (moments None before the first update),
          "params": [{"name", "chunk", "shape" (local), "global_shape", "tp_shard" (dim, rank, size) or None,
                      "range": (start, end) in the buffer, "owned_range": its part inside "shard_range"}],
        }, ...
      ],
    }

Element ``i`` of ``master`` is buffer element ``shard_range[0] + i``; parameter ``p`` is the flattened local
tensor at ``range``, and its local tensor is tp shard ``tp_shard`` of a ``global_shape`` tensor
(`TPShard.to_record` and `TPShard.global_shape` of the parameter's slot). That is enough to rebuild full fp32
tensors from all shards and cut them again for another layout (`full_state.py`); ``read_shard_state`` itself
accepts only the identical layout.

The helpers here work on values: the optimizer hands over its flat buffers, ranks and `StateValues`, and
installs the `StateValues` a load returns (``HybridZeroOptimizer._install_state``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .flat_buffer import FlatBuffer

FORMAT = "internlm.hybrid_zero.v1"
_LAYOUT_KEYS = ("zero1_size", "zero1_rank", "tp_size", "tp_rank")


@dataclass
class StateValues:
    """One rank's optimizer state as values: per flat buffer its fp32 master slice and ``(exp_avg, exp_avg_sq)``
    (``moments`` None before the first update), AdamW steps applied, skipped steps, lr and betas."""

    masters: List[torch.Tensor]
    moments: Optional[List[Tuple[torch.Tensor, torch.Tensor]]]
    num_updates: int
    skipped_steps: int
    lr: float
    betas: Tuple[float, float]


def _buffer_meta(buffer: FlatBuffer) -> Dict[str, Any]:
    params = [
        {
            "name": slot.name,
            "chunk": buffer.key.chunk,
            "shape": list(slot.param.shape),
            "global_shape": list(slot.shard.global_shape),
            "tp_shard": slot.shard.to_record(),
            "range": (slot.start, slot.end),
            "owned_range": buffer.owned_range(slot),
        }
        for slot in buffer.slots
    ]
    key = buffer.key
    return {
        "key": {
            "chunk": key.chunk,
            "dtype": str(key.dtype),
            "decay": key.decay,
            "tp_duplicate": key.tp_duplicate,
            "tp_partial_grad": key.tp_partial_grad,
        },
        "numel": buffer.numel,
        "padded_numel": buffer.padded_numel,
        "shard_range": (buffer.shard_start, buffer.shard_end),
        "params": params,
    }


def shard_ranks(pc: Any) -> Dict[str, int]:
    """The group sizes and ranks a shard records (checked again when it is loaded)."""
    return dict(
        zero1_size=pc.zero1_size,
        zero1_rank=pc.zero1_rank,
        dp_size=pc.dp_size,
        dp_rank=pc.dp_rank,
        tp_size=pc.tp_size,
        tp_rank=pc.tp_rank,
        pp_size=pc.pp_size,
    )


def shard_state(
    ranks: Mapping[str, int],
    buffers: Sequence[FlatBuffer],
    values: StateValues,
    copy: bool = True,
    device: Optional[Union[str, torch.device]] = None,
) -> Dict[str, Any]:
    """This rank's optimizer shard as plain tensors and Python values (safe to ``torch.save``).

    ``ranks``: ``zero1_size, zero1_rank, dp_size, dp_rank, tp_size, tp_rank, pp_size``; ``values`` belong to
    ``buffers`` (one master slice per buffer, in order). Tensors are copied (onto ``device``, default: where
    they are); ``copy=False`` returns the live tensors (or copies only where ``device`` differs), for a caller
    that writes them out before the next update.
    """

    def take(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to(device if device is not None else tensor.device, copy=copy)

    entries = []
    for index, (buffer, master) in enumerate(zip(buffers, values.masters)):
        entry = _buffer_meta(buffer)
        entry["master"] = take(master)
        if values.moments is None:
            entry["exp_avg"] = entry["exp_avg_sq"] = None
        else:
            exp_avg, exp_avg_sq = values.moments[index]
            entry["exp_avg"], entry["exp_avg_sq"] = take(exp_avg), take(exp_avg_sq)
        entries.append(entry)
    return {
        "format": FORMAT,
        **ranks,
        "num_updates": values.num_updates,
        "skipped_steps": values.skipped_steps,
        "lr": values.lr,
        "betas": tuple(values.betas),
        "buffers": entries,
    }


def layout_differences(expected: Mapping[str, Any], saved: Mapping[str, Any]) -> List[str]:
    """Human-readable differences between this rank's layout and a saved shard's layout (empty if equal).

    Causes (group sizes and ranks, buffer kinds, parameter names and shapes) come first; offset and size
    differences, which any shape change entails, are listed only when no cause was found.
    """
    causes = [
        f"{k}: saved {saved.get(k)} vs current {expected[k]}" for k in _LAYOUT_KEYS if saved.get(k) != expected[k]
    ]
    offsets: List[str] = []
    mine, theirs = expected["buffers"], saved.get("buffers", [])
    if len(mine) != len(theirs):
        causes.append(f"number of flat buffers: saved {len(theirs)} vs current {len(mine)}")
    for i, (a, b) in enumerate(zip(mine, theirs)):
        if a["key"] != b["key"]:
            causes.append(f"buffer {i} kind: saved {b['key']} vs current {a['key']}")
        if (a["padded_numel"], tuple(a["shard_range"])) != (b["padded_numel"], tuple(b["shard_range"])):
            offsets.append(
                f"buffer {i} size/slice: saved {b['padded_numel']} {tuple(b['shard_range'])} "
                f"vs current {a['padded_numel']} {tuple(a['shard_range'])}"
            )
        saved_params = {p["name"]: p for p in b["params"]}
        current = {p["name"]: p for p in a["params"]}
        for name in sorted(set(saved_params) ^ set(current)):
            where = "saved only" if name in saved_params else "current only"
            causes.append(f"buffer {i} parameter {name}: {where}")
        for name in sorted(set(saved_params) & set(current)):
            p, q = current[name], saved_params[name]
            if list(p["shape"]) != list(q["shape"]):
                causes.append(f"parameter {name}: saved shape {list(q['shape'])} vs current {list(p['shape'])}")
            elif tuple(p["range"]) != tuple(q["range"]):
                offsets.append(f"parameter {name}: saved at {tuple(q['range'])} vs current {tuple(p['range'])}")
    return causes or offsets


def read_shard_state(state: Mapping[str, Any], ranks: Mapping[str, int], buffers: Sequence[FlatBuffer]) -> StateValues:
    """The values of a saved shard, after checking that it was saved under this rank's layout (``ranks`` and
    ``buffers`` as for `shard_state`). Raises ValueError naming the differences."""
    if state.get("format") != FORMAT:
        raise ValueError(f"not a hybrid ZeRO optimizer shard: format {state.get('format')!r}, expected {FORMAT!r}")
    expected: Dict[str, Any] = {k: ranks[k] for k in _LAYOUT_KEYS}
    expected["buffers"] = [_buffer_meta(buffer) for buffer in buffers]
    diffs = layout_differences(expected, state)
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; ... ({len(diffs) - 8} more)" if len(diffs) > 8 else "")
        raise ValueError(f"optimizer shard does not match the current layout: {shown}")
    saved = state["buffers"]
    has_moments = all(entry["exp_avg"] is not None for entry in saved)
    return StateValues(
        masters=[entry["master"] for entry in saved],
        moments=[(entry["exp_avg"], entry["exp_avg_sq"]) for entry in saved] if has_moments else None,
        num_updates=int(state["num_updates"]),
        skipped_steps=int(state["skipped_steps"]),
        lr=state["lr"],
        betas=tuple(state["betas"]),
    )


__all__ = ["FORMAT", "StateValues", "shard_state", "layout_differences", "read_shard_state"]
