"""Load a checkpoint saved under one parallel layout into a run with another, streaming tensor by tensor.

The `Layout` (recorded in every checkpoint's ``meta.json``) decides which tensors a rank holds and how its
files are named. Every file is memory-mapped (``torch.load(..., mmap=True)``): opening one reads only its
small pickled index, and a tensor's bytes are read when, and only where, they are copied. A rank never
builds a full tensor:

* model (`load_model_resharded`): for each local tensor, the pieces its `TPShard` overlaps in the saved
  tensor ranks' files are copied straight into the parameter (`internlm.optim.full_state.copy_overlap`).
* optimizer (`load_optimizer_resharded`): `ShardedFullState` indexes the shards of one data-parallel replica
  (the first zero1 block; the other blocks hold the same values); `HybridZeroOptimizer.load_full_state`
  copies each owned slice of master, ``exp_avg`` and ``exp_avg_sq`` from them into its own tensors.

So the memory a rank needs is its own final state (the mapped file pages are the page cache's, not the
process's). `merge_optimizer_checkpoint` (and `checkpoint.merge_model_checkpoint`) build full tensors of the
whole model: they are export tools, not the resume path. RNG states are per rank and do not carry over to
another layout; the data sampler state is layout independent.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from internlm.optim.full_state import ShardedFullState, copy_overlap, merge_shard_states
from internlm.parallel import Layout, TPShard, param_shards

from .checkpoint_files import META_FILE, checkpoint_layout, model_file, optim_file


def _open(path: str, name: str, layout: Layout) -> Any:
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"checkpoint {path}: {name} is missing (its {META_FILE} records {layout.describe()})")
    return torch.load(file, map_location="cpu", weights_only=False, mmap=True)


def _saved_model_tensors(path: str, layout: Layout) -> Dict[str, Dict[int, Tuple[TPShard, torch.Tensor]]]:
    """Per tensor name, per saved tensor rank: its `TPShard` and its memory-mapped local tensor."""
    index: Dict[str, Dict[int, Tuple[TPShard, torch.Tensor]]] = {}
    for pp_rank in range(layout.pipeline):
        for tp_rank in range(layout.tensor):
            saved = _open(path, model_file(tp_rank, pp_rank), layout)
            for chunk_index, state in enumerate(saved["chunks"]):
                records = saved["tp_shards"][chunk_index]
                for name, tensor in state.items():
                    shard = TPShard.from_record(tensor.shape, records.get(name))
                    index.setdefault(name, {})[tp_rank] = (shard, tensor)
    return index


@torch.no_grad()
def load_model_resharded(path: str, model_chunks: Sequence[nn.Module]) -> None:
    """Load this rank's model chunks from checkpoint ``path``, whatever layout saved it.

    For each tensor of each chunk's state dict, the saved pieces (every tensor rank of a split tensor, tensor
    rank 0 of a replicated one) are copied into the part of the local tensor they overlap, in place
    (parameters may be views into an optimizer's flat buffer). Raises KeyError / ValueError naming the
    checkpoint, chunk and tensor when one is missing or misshapen.
    """
    layout = checkpoint_layout(path)
    saved = _saved_model_tensors(path, layout)
    for index, chunk in enumerate(model_chunks):
        shards = param_shards(chunk)
        for name, tensor in chunk.state_dict(keep_vars=True).items():
            pieces = saved.get(name)
            if pieces is None:
                raise KeyError(
                    f"checkpoint {path} has no tensor {name!r} (needed by model chunk {index}); it was "
                    f"saved for another model"
                )
            shard = shards.get(name) or TPShard.replicated(tensor.shape)
            lowest = pieces[min(pieces)][0]
            if tuple(lowest.global_shape) != tuple(shard.global_shape):
                raise ValueError(
                    f"checkpoint {path}: {name} (model chunk {index}, tensor shard {shard.to_record()}): expected "
                    f"a tensor of the full shape {list(shard.global_shape)}, got {list(lowest.global_shape)}"
                )
            ranks = range(lowest.size) if lowest.is_split else [min(pieces)]
            if any(r not in pieces for r in ranks):
                raise ValueError(f"checkpoint {path}: {name} lacks tensor ranks {sorted(set(ranks) - set(pieces))}")
            data = tensor.data
            flat = data.view(-1) if data.is_contiguous() else torch.empty(data.numel(), dtype=data.dtype)
            copied = sum(copy_overlap(flat, shard, 0, pieces[r][1].reshape(-1), pieces[r][0], 0) for r in ranks)
            if copied != data.numel():
                raise ValueError(f"checkpoint {path}: {name}: {copied} of {data.numel()} elements found")
            if not data.is_contiguous():
                data.copy_(flat.view(data.shape))


def _replica_shards(path: str, layout: Layout) -> Iterator[Tuple[str, Mapping[str, Any]]]:
    """The optimizer shards of zero1 ranks ``0 .. zero1-1`` (one complete replica of the state) for every tensor
    rank and pipeline stage, memory-mapped, one at a time."""
    for pp_rank in range(layout.pipeline):
        for tp_rank in range(layout.tensor):
            for dp_rank in range(layout.zero1):
                name = optim_file(tp_rank, pp_rank, dp_rank)
                shard = _open(path, name, layout)
                where = (shard.get("tp_rank"), shard.get("zero1_rank"), shard.get("zero1_size"))
                if where != (tp_rank, dp_rank, layout.zero1):
                    raise ValueError(
                        f"checkpoint {path}: {name} holds tensor rank {where[0]}, zero1 rank {where[1]}, "
                        f"zero1 size {where[2]}; expected {tp_rank}, {dp_rank}, {layout.zero1}"
                    )
                yield name, shard


def sharded_optimizer_state(path: str, names: Optional[Sequence[str]] = None) -> ShardedFullState:
    """The layout-independent optimizer state of checkpoint ``path`` as a lazy index over its memory-mapped
    shards (nothing is copied until a rank cuts its slices out of it). ``names`` restricts it to those
    parameters."""
    return ShardedFullState(_replica_shards(path, checkpoint_layout(path)), names)


def load_optimizer_resharded(path: str, optimizer: Any, names: Optional[Sequence[str]] = None) -> None:
    """Restore ``optimizer`` (a `HybridZeroOptimizer` of any layout) from checkpoint ``path``: each owned slice
    is copied straight from the saved shards (collective over its zero1 group, like ``load_full_state``)."""
    optimizer.load_full_state(sharded_optimizer_state(path, names))


def merge_optimizer_checkpoint(path: str, names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The layout-independent optimizer state of checkpoint ``path``, materialised (format in
    ``internlm/optim/full_state.py``): per parameter name the full fp32 ``master``, ``exp_avg`` and
    ``exp_avg_sq`` of the global shape, plus ``num_updates``, ``skipped_steps``, ``lr`` and ``betas``.
    An export tool: it holds the whole selected state (``names`` restricts it).

    Zero1 slices of each flat buffer are stitched by their recorded ranges, tensor shards concatenated on
    their dimension; data-parallel replicas beyond the first zero1 group hold the same values and are not
    saved.
    """
    layout = checkpoint_layout(path)
    return merge_shard_states(_replica_shards(path, layout), names)


def trainable_names(model_chunks: Sequence[nn.Module]) -> List[str]:
    """Names of the parameters an optimizer over ``model_chunks`` holds."""
    return [name for chunk in model_chunks for name, p in chunk.named_parameters() if p.requires_grad]


__all__ = [
    "load_model_resharded",
    "load_optimizer_resharded",
    "merge_optimizer_checkpoint",
    "sharded_optimizer_state",
    "trainable_names",
]
