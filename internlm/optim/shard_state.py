"""Checkpoint format of one rank's optimizer shard, with the layout metadata needed to reshard it.

``shard_state(opt)`` returns::

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
tensor at ``range``, and its local tensor is tp shard ``tp_shard`` of a ``global_shape`` tensor. That is
enough to rebuild full fp32 tensors from all shards and cut them again for another layout (`full_state.py`);
``load_shard_state`` itself accepts only the identical layout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .flat_buffer import FlatBuffer

if TYPE_CHECKING:  # pragma: no cover
    from .hybrid_zero import HybridZeroOptimizer

FORMAT = "internlm.hybrid_zero.v1"
_LAYOUT_KEYS = ("zero1_size", "zero1_rank", "tp_size", "tp_rank")


def global_shape(shape: Sequence[int], tp_shard: Optional[Sequence[int]]) -> List[int]:
    """Full shape of a tensor-parallel shard ``(dim, rank, size)`` of local ``shape``."""
    out = list(shape)
    if tp_shard is not None:
        dim, _, size = tp_shard
        out[dim] *= size
    return out


def _buffer_meta(buffer: FlatBuffer) -> Dict[str, Any]:
    params = []
    for slot in buffer.slots:
        tp_shard = getattr(slot.param, "_tp_shard", None)
        params.append(
            {
                "name": slot.name,
                "chunk": buffer.key.chunk,
                "shape": list(slot.param.shape),
                "global_shape": global_shape(slot.param.shape, tp_shard),
                "tp_shard": tuple(tp_shard) if tp_shard is not None else None,
                "range": (slot.start, slot.end),
                "owned_range": buffer.owned_range(slot),
            }
        )
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


def shard_state(opt: "HybridZeroOptimizer") -> Dict[str, Any]:
    """This rank's optimizer shard as plain tensors and Python values (safe to ``torch.save``)."""
    pc = opt.pc
    buffers = []
    for buffer, master in zip(opt.buffers, opt.masters):
        entry = _buffer_meta(buffer)
        state = opt.optimizer.state.get(master, {})
        entry["master"] = master.detach().clone()
        for name in ("exp_avg", "exp_avg_sq"):
            entry[name] = state[name].detach().clone() if name in state else None
        buffers.append(entry)
    group = opt.optimizer.param_groups[0]
    return {
        "format": FORMAT,
        "zero1_size": pc.zero1_size,
        "zero1_rank": pc.zero1_rank,
        "dp_size": pc.dp_size,
        "dp_rank": pc.dp_rank,
        "tp_size": pc.tp_size,
        "tp_rank": pc.tp_rank,
        "pp_size": pc.pp_size,
        "num_updates": opt.num_updates,
        "skipped_steps": opt.skipped_steps,
        "lr": group["lr"],
        "betas": tuple(group["betas"]),
        "buffers": buffers,
    }


def layout_differences(expected: Mapping[str, Any], saved: Mapping[str, Any]) -> List[str]:
    """Human-readable differences between this rank's layout and a saved shard's layout (empty if equal).

    Causes (group sizes and ranks, buffer kinds, parameter names and shapes) come first; offset and size
    differences, which any shape change entails, are listed only when no cause was found.
    """
    causes = [f"{k}: saved {saved.get(k)} vs current {expected[k]}" for k in _LAYOUT_KEYS if saved.get(k) != expected[k]]
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


@torch.no_grad()
def load_shard_state(opt: "HybridZeroOptimizer", state: Mapping[str, Any]) -> None:
    """Copy a saved shard into ``opt`` (masters, moments, counters, lr, betas) after checking its layout."""
    if state.get("format") != FORMAT:
        raise ValueError(f"not a hybrid ZeRO optimizer shard: format {state.get('format')!r}, expected {FORMAT!r}")
    expected = {k: getattr(opt.pc, k) for k in _LAYOUT_KEYS}
    expected["buffers"] = [_buffer_meta(buffer) for buffer in opt.buffers]
    diffs = layout_differences(expected, state)
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; ... ({len(diffs) - 8} more)" if len(diffs) > 8 else "")
        raise ValueError(f"optimizer shard does not match the current layout: {shown}")

    for master, saved in zip(opt.masters, state["buffers"]):
        master.copy_(saved["master"])
    has_moments = all(saved["exp_avg"] is not None for saved in state["buffers"])
    moments = [(saved["exp_avg"], saved["exp_avg_sq"]) for saved in state["buffers"]] if has_moments else None
    install_state(opt, moments, int(state["num_updates"]), int(state["skipped_steps"]), state["lr"],
                  tuple(state["betas"]))


def install_state(opt: "HybridZeroOptimizer", moments: Optional[Sequence[Tuple[torch.Tensor, torch.Tensor]]],
                  num_updates: int, skipped_steps: int, lr: float, betas: Tuple[float, float]) -> None:
    """Set the AdamW state of ``opt``: per buffer ``(exp_avg, exp_avg_sq)`` of its owned slice (``moments``;
    None: no update yet, no state), AdamW's step count ``num_updates``, the counters, lr and betas.

    Each param group keeps its own weight decay (it follows the buffer kind, not the checkpoint).
    """
    torch_state: Dict[str, Any] = {"state": {}, "param_groups": []}
    for index, (master, group) in enumerate(zip(opt.masters, opt.optimizer.param_groups)):
        if moments is not None:
            exp_avg, exp_avg_sq = moments[index]
            torch_state["state"][index] = {
                "step": torch.tensor(float(num_updates), dtype=torch.float32),
                "exp_avg": exp_avg.to(master.device),
                "exp_avg_sq": exp_avg_sq.to(master.device),
            }
        restored = {k: v for k, v in group.items() if k != "params"}
        restored.update(params=[index], lr=lr, betas=tuple(betas))
        torch_state["param_groups"].append(restored)
    opt.optimizer.load_state_dict(torch_state)
    opt.num_updates = num_updates
    opt.skipped_steps = skipped_steps


__all__ = ["FORMAT", "global_shape", "shard_state", "layout_differences", "load_shard_state", "install_state"]
