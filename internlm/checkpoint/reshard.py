"""Load a checkpoint saved under one parallel layout into a run with another, streaming tensor by tensor; and
full tensors (a Hugging Face folder) into this rank's shards.

The `Layout` (recorded in every checkpoint's ``meta.json``) decides which tensors a rank holds and how its
files are named. Every file is memory-mapped (`internlm.checkpoint.reader.load_file`): opening one reads only
its small pickled index, and a tensor's bytes are read when, and only where, they are copied. A rank never
builds a full tensor:

* model (`load_model_resharded`): for each local tensor, the pieces the saved tensor ranks hold
  (`CheckpointReader.pieces`, the one parser of model files) are copied into the part of it they overlap
  (`copy_pieces`, by `internlm.optim.full_state.copy_overlap`'s index arithmetic).
* optimizer (`load_optimizer_resharded`): `ShardedFullState` indexes the shards of one data-parallel replica
  (the first zero1 block; the other blocks hold the same values); `HybridZeroOptimizer.load_full_state`
  copies each owned slice of master, ``exp_avg`` and ``exp_avg_sq`` from them into its own tensors.
* full tensors (`load_full_weights`, `load_hf_weights`: ``ckpt.load_ckpt_info`` with ``ckpt_type="hf"``): each
  is one replicated piece, cut into this rank's shards by the same `copy_pieces`.

So the memory a rank needs is its own final state (the mapped file pages are the page cache's, not the
process's). `merge_optimizer_checkpoint` (and `reader.merge_model_checkpoint`) build full tensors of the whole
model: they are export tools, not the resume path. RNG states are per rank and do not carry over to another
layout; the data sampler state is layout independent.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from internlm.optim.full_state import ShardedFullState, copy_overlap, merge_shard_states
from internlm.parallel import Layout, TPShard, param_shards

from .files import META_FILE, optim_file, read_meta
from .reader import CheckpointReader, TensorEntry, load_file


def checkpoint_layout(path: str) -> Layout:
    """The layout recorded in checkpoint ``path``'s meta.json."""
    meta = read_meta(path)
    if "layout" not in meta:
        raise ValueError(f"checkpoint {path}: {META_FILE} has no 'layout'; it cannot be resharded")
    try:
        return Layout.from_dict(meta["layout"])
    except ValueError as exc:
        raise ValueError(f"checkpoint {path}: {META_FILE} 'layout': {exc}") from None


@torch.no_grad()
def copy_pieces(tensor: torch.Tensor, shard: TPShard, pieces: Iterable[Tuple[torch.Tensor, TPShard]]) -> int:
    """Copy into local ``tensor`` (this rank's ``shard`` of a full tensor) the elements it shares with each saved
    piece ``(values, its TPShard)``, in place (parameters may be views into an optimizer's flat buffer), casting
    to ``tensor``'s dtype; returns how many elements were copied (``tensor.numel()`` when the pieces cover it)."""
    data = tensor.data
    flat = data.view(-1) if data.is_contiguous() else torch.empty(data.numel(), dtype=data.dtype)
    copied = sum(copy_overlap(flat, shard, 0, values.reshape(-1), source, 0) for values, source in pieces)
    if not data.is_contiguous():
        data.copy_(flat.view(data.shape))
    return copied


def _local_tensors(model_chunks: Sequence[nn.Module]) -> Iterator[Tuple[int, str, torch.Tensor, TPShard]]:
    """``(chunk index, name, local tensor, its TPShard)`` of every state-dict tensor of ``model_chunks``."""
    for index, chunk in enumerate(model_chunks):
        shards = param_shards(chunk)
        for name, tensor in chunk.state_dict(keep_vars=True).items():
            yield index, name, tensor, shards.get(name) or TPShard.replicated(tensor.shape)


def _saved_shard(entry: TensorEntry, rank: int) -> TPShard:
    """The `TPShard` tensor rank ``rank``'s saved piece of ``entry`` had."""
    if entry.dim is None:
        return TPShard.replicated(entry.shape)
    return TPShard(entry.shape, entry.dim, rank, len(entry.pieces))


@torch.no_grad()
def load_model_resharded(path: str, model_chunks: Sequence[nn.Module]) -> None:
    """Load this rank's model chunks from checkpoint ``path``, whatever layout saved it.

    For each tensor of each chunk's state dict, the saved pieces (every tensor rank of a split tensor, tensor
    rank 0 of a replicated one) are copied into the part of the local tensor they overlap (`copy_pieces`).
    Raises KeyError / ValueError naming the checkpoint, chunk and tensor when one is missing or misshapen.
    """
    layout = checkpoint_layout(path)
    reader = CheckpointReader(path, layout_text=layout.describe())
    entries = reader.entries()
    for index, name, tensor, shard in _local_tensors(model_chunks):
        entry = entries.get(name)
        if entry is None:
            raise KeyError(
                f"checkpoint {path} has no tensor {name!r} (needed by model chunk {index}); it was "
                f"saved for another model"
            )
        if tuple(entry.shape) != tuple(shard.global_shape):
            raise ValueError(
                f"checkpoint {path}: {name} (model chunk {index}, tensor shard {shard.to_record()}): expected "
                f"a tensor of the full shape {list(shard.global_shape)}, got {list(entry.shape)}"
            )
        saved = reader.pieces(name)
        ranks = range(len(entry.pieces)) if entry.dim is not None else [0]
        if any(r not in saved for r in ranks):
            raise ValueError(f"checkpoint {path}: {name} lacks tensor ranks {sorted(set(ranks) - set(saved))}")
        copied = copy_pieces(tensor, shard, [(saved[r], _saved_shard(entry, r)) for r in ranks])
        if copied != tensor.numel():
            raise ValueError(f"checkpoint {path}: {name}: {copied} of {tensor.numel()} elements found")
    reader.close()


@torch.no_grad()
def load_full_weights(
    tensors: Iterable[Tuple[str, torch.Tensor]], model_chunks: Sequence[nn.Module], source: str
) -> None:
    """Copy full (unsharded) tensors, given one at a time as ``(our name, tensor)``, into this rank's chunks: each
    local tensor of that name takes the part of the full tensor its `TPShard` covers (`copy_pieces`, as
    resharding does), cast to its dtype; names this rank does not hold (other pipeline stages) are skipped.
    Raises KeyError / ValueError naming ``source`` and the tensor when one is missing or misshapen."""
    local: Dict[str, list] = {}
    for index, name, tensor, shard in _local_tensors(model_chunks):
        local.setdefault(name, []).append((index, tensor, shard))
    filled = set()
    for name, full in tensors:
        for index, tensor, shard in local.get(name, ()):
            if tuple(full.shape) != tuple(shard.global_shape):
                raise ValueError(
                    f"{source}: {name} has shape {list(full.shape)}, this model needs {list(shard.global_shape)} "
                    f"(model chunk {index}); the model keys differ from the folder's config"
                )
            copied = copy_pieces(tensor, shard, [(full, TPShard.replicated(full.shape))])
            if copied != tensor.numel():
                raise ValueError(f"{source}: {name}: {copied} of {tensor.numel()} elements found")
            filled.add(name)
    missing = sorted(set(local) - filled)
    if missing:
        raise KeyError(f"{source} lacks {len(missing)} tensors this model needs: {', '.join(missing[:8])}")


def load_hf_weights(path: str, model_chunks: Sequence[nn.Module]) -> None:
    """Load a Hugging Face folder (``ckpt_type="hf"``) into this rank's chunks: its tensors in our names, streamed
    one at a time by `internlm.model.hf.iter_hf_tensors`, cut into the tensor shards (`load_full_weights`)."""
    from internlm.model.hf import iter_hf_tensors

    load_full_weights(iter_hf_tensors(path), model_chunks, f"Hugging Face folder {path}")


# ---------------------------------------------------------------------- optimizer
def _replica_shards(path: str, layout: Layout) -> Iterator[Tuple[str, Mapping[str, Any]]]:
    """The optimizer shards of zero1 ranks ``0 .. zero1-1`` (one complete replica of the state) for every tensor
    rank and pipeline stage, memory-mapped, one at a time."""
    for pp_rank in range(layout.pipeline):
        for tp_rank in range(layout.tensor):
            for dp_rank in range(layout.zero1):
                name = optim_file(tp_rank, pp_rank, dp_rank)
                shard = load_file(path, name, layout.describe())
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
    return merge_shard_states(_replica_shards(path, checkpoint_layout(path)), names)


def trainable_names(model_chunks: Sequence[nn.Module]) -> List[str]:
    """Names of the parameters an optimizer over ``model_chunks`` holds."""
    return [name for chunk in model_chunks for name, p in chunk.named_parameters() if p.requires_grad]


__all__ = [
    "checkpoint_layout",
    "copy_pieces",
    "load_full_weights",
    "load_hf_weights",
    "load_model_resharded",
    "load_optimizer_resharded",
    "merge_optimizer_checkpoint",
    "sharded_optimizer_state",
    "trainable_names",
]
