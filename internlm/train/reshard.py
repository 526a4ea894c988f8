"""Load a checkpoint saved under one parallel layout into a run with another.

The `Layout` (recorded in every checkpoint's ``meta.json``) decides which tensors a rank holds and how its
files are named. Resharding goes through full tensors:

* model: `merge_model_checkpoint` joins the tensor shards of every saved stage; each local parameter then
  takes its own piece with its `TPShard` (``shard.slice(full)``).
* optimizer: `merge_optimizer_checkpoint` stitches the zero1 slices of one data-parallel replica into full
  fp32 master weights and Adam moments per parameter name; `HybridZeroOptimizer.load_full_state` cuts
  this rank's owned slices out of them.

Both read only the tensors this rank needs (files are memory-mapped). RNG states are per rank and do not
carry over to another layout; the data sampler state is layout independent.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from internlm.optim.full_state import merge_shard_states
from internlm.parallel import Layout, TPShard, param_shards

from .checkpoint import checkpoint_layout, merge_model_checkpoint, optim_file


@torch.no_grad()
def load_model_resharded(path: str, model_chunks: Sequence[nn.Module]) -> None:
    """Load this rank's model chunks from checkpoint ``path``, whatever layout saved it.

    Every tensor of each chunk's state dict is read in full from the checkpoint, then cut to the local
    parameter's `TPShard` (``shard.slice(full)``; buffers and replicated tensors are taken whole). Values are
    copied in place (parameters may be views into an optimizer's flat buffer).
    Raises KeyError / ValueError naming the checkpoint, chunk and tensor when one is missing or misshapen.
    """
    local_states = [chunk.state_dict(keep_vars=True) for chunk in model_chunks]
    names = {name for state in local_states for name in state}
    full = merge_model_checkpoint(path, names)
    for index, (chunk, state) in enumerate(zip(model_chunks, local_states)):
        shards = param_shards(chunk)
        for name, tensor in state.items():
            if name not in full:
                raise KeyError(
                    f"checkpoint {path} has no tensor {name!r} (needed by model chunk {index}); it was "
                    f"saved for another model"
                )
            shard = shards.get(name) or TPShard.replicated(tensor.shape)
            try:
                source = shard.slice(full[name])
            except ValueError as exc:
                raise ValueError(
                    f"checkpoint {path}: {name} (model chunk {index}, tensor shard {shard.to_record()}): {exc}"
                ) from None
            tensor.data.copy_(source)


def _replica_shards(path: str, layout: Layout) -> Iterator[Tuple[str, Mapping[str, Any]]]:
    """The optimizer shards of data-parallel ranks ``0 .. zero1-1`` (the first zero1 group: one complete
    replica of the state) for every tensor rank and pipeline stage, loaded one at a time."""
    for pp_rank in range(layout.pipeline):
        for tp_rank in range(layout.tensor):
            for dp_rank in range(layout.zero1):
                name = optim_file(tp_rank, pp_rank, dp_rank)
                file = os.path.join(path, name)
                if not os.path.isfile(file):
                    raise FileNotFoundError(
                        f"checkpoint {path}: {name} is missing (its meta.json records {layout.describe()})"
                    )
                shard = torch.load(file, map_location="cpu", weights_only=False, mmap=True)
                where = (shard.get("tp_rank"), shard.get("dp_rank"), shard.get("zero1_size"))
                if where != (tp_rank, dp_rank, layout.zero1):
                    raise ValueError(
                        f"checkpoint {path}: {name} holds tensor rank {where[0]}, data rank {where[1]}, "
                        f"zero1 size {where[2]}; expected {tp_rank}, {dp_rank}, {layout.zero1}"
                    )
                yield name, shard


def merge_optimizer_checkpoint(path: str, names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The layout-independent optimizer state of checkpoint ``path`` (format in
    ``internlm/optim/full_state.py``): per parameter name the full fp32 ``master``, ``exp_avg`` and
    ``exp_avg_sq`` of the global shape, plus ``num_updates``, ``skipped_steps``, ``lr`` and ``betas``.

    Zero1 slices of each flat buffer are stitched by their recorded ranges, tensor shards concatenated on
    their dimension; data-parallel replicas beyond the first zero1 group hold the same values and are not
    read. ``names`` restricts the result to those parameters.
    """
    layout = checkpoint_layout(path)
    return merge_shard_states(_replica_shards(path, layout), names)


def trainable_names(model_chunks: Sequence[nn.Module]) -> List[str]:
    """Names of the parameters an optimizer over ``model_chunks`` holds."""
    return [name for chunk in model_chunks for name, p in chunk.named_parameters() if p.requires_grad]


__all__ = ["load_model_resharded", "merge_optimizer_checkpoint", "trainable_names"]
