"""Atomic, resumable checkpoints: ``<save_ckpt_folder>/<step>/``.

A checkpoint folder holds

    meta.json                    written last by rank 0: step, phase, tokens, layout, phase history
    train_state.pt               rank 0: data sampler state (identical on every rank)
    model_tp{t}_pp{p}.pt         model chunks of tensor rank t, pipeline stage p (saved by data rank 0)
    optim_tp{t}_pp{p}_dp{d}.pt   optimizer shard of that rank (fp32 master + Adam states + layout metadata)
    rng_rank{r}.pt               RNG states of global rank r

Every rank writes into ``.tmp-<step>/``; after a barrier rank 0 writes ``meta.json`` and renames the folder
to ``<step>/`` (an atomic rename on POSIX file systems). A crash during a save therefore leaves only a
``.tmp-*`` folder, which is never taken for a checkpoint and is removed by the next save. The folder must be
on a file system that every rank sees (as on any multi-node cluster with shared storage).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any, Collection, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from internlm.parallel import Layout, TPShard, param_shards

META_FILE = "meta.json"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def complete_checkpoints(root: str) -> List[int]:
    """Steps of the complete checkpoints under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    steps = []
    for name in os.listdir(root):
        if name.isdigit() and os.path.isfile(os.path.join(root, name, META_FILE)):
            steps.append(int(name))
    return sorted(steps)


def latest_checkpoint(root: str) -> Optional[str]:
    steps = complete_checkpoints(root)
    return os.path.join(root, str(steps[-1])) if steps else None


def read_meta(path: str) -> Dict[str, Any]:
    with open(os.path.join(path, META_FILE)) as f:
        return json.load(f)


def checkpoint_layout(path: str) -> Layout:
    """The layout recorded in checkpoint ``path``'s meta.json."""
    meta = read_meta(path)
    if "layout" not in meta:
        raise ValueError(f"checkpoint {path}: {META_FILE} has no 'layout'; it cannot be resharded")
    try:
        return Layout.from_dict(meta["layout"])
    except ValueError as exc:
        raise ValueError(f"checkpoint {path}: {META_FILE} 'layout': {exc}") from None


def model_file(tp_rank: int, pp_rank: int) -> str:
    """Model chunks of tensor rank ``tp_rank`` and pipeline stage ``pp_rank``."""
    return f"model_tp{tp_rank}_pp{pp_rank}.pt"


def optim_file(tp_rank: int, pp_rank: int, dp_rank: int) -> str:
    """Optimizer shard of the rank at grid coordinates (tp_rank, pp_rank, dp_rank)."""
    return f"optim_tp{tp_rank}_pp{pp_rank}_dp{dp_rank}.pt"


def _rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Saves and loads the training state of every rank, keeping the newest `keep_last` checkpoints."""

    def __init__(self, root: str, pc: Any, keep_last: int = 3) -> None:
        self.root = root
        self.pc = pc
        self.keep_last = keep_last

    # ------------------------------------------------------------------ names
    def _model_file(self) -> str:
        return model_file(self.pc.tp_rank, self.pc.pp_rank)

    def _optim_file(self) -> str:
        return optim_file(self.pc.tp_rank, self.pc.pp_rank, self.pc.dp_rank)

    # ------------------------------------------------------------------ save
    def save(self, step: int, model_chunks, optimizer, train_state: Dict[str, Any], meta: Dict[str, Any]) -> str:
        final = os.path.join(self.root, str(step))
        tmp = os.path.join(self.root, f".tmp-{step}")
        if self.pc.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            for name in os.listdir(self.root):
                if name.startswith(".tmp-"):
                    shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
            os.makedirs(tmp)
        _barrier()
        if self.pc.dp_rank == 0:
            shards = [
                {name: shard.to_record() for name, shard in param_shards(chunk).items()} for chunk in model_chunks
            ]
            torch.save(
                {"chunks": [chunk.state_dict() for chunk in model_chunks], "tp_shards": shards},
                os.path.join(tmp, self._model_file()),
            )
        torch.save(optimizer.state_dict(), os.path.join(tmp, self._optim_file()))
        torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{self.pc.rank}.pt"))
        if self.pc.rank == 0:
            torch.save(train_state, os.path.join(tmp, "train_state.pt"))
        _barrier()
        if self.pc.rank == 0:
            with open(os.path.join(tmp, META_FILE), "w") as f:
                json.dump(meta, f, indent=1)
            if os.path.isdir(final):  # re-saving a step (e.g. after an edited phase): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        steps = complete_checkpoints(self.root)
        for step in steps[: max(0, len(steps) - self.keep_last)]:
            shutil.rmtree(os.path.join(self.root, str(step)), ignore_errors=True)

    # ------------------------------------------------------------------ load
    def load_model(self, path: str, model_chunks) -> None:
        """Restore this rank's model chunks from checkpoint `path`."""
        model_path = os.path.join(path, self._model_file())
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"checkpoint {path} has no {self._model_file()}: it was saved under another parallel layout "
                f"(see its {META_FILE}); load it with internlm.train.reshard.load_model_resharded"
            )
        states = torch.load(model_path, map_location="cpu", weights_only=False)["chunks"]
        if len(states) != len(model_chunks):
            raise ValueError(f"checkpoint {path} holds {len(states)} model chunks, this run has {len(model_chunks)}")
        for chunk, state in zip(model_chunks, states):
            chunk.load_state_dict(state)

    def load_optimizer(self, path: str, optimizer) -> None:
        state = torch.load(os.path.join(path, self._optim_file()), map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state)

    def load_train_state(self, path: str, restore_rng: bool = True) -> Dict[str, Any]:
        """Restore this rank's RNG states (unless ``restore_rng`` is False: they belong to the saving layout's
        ranks); return the rank-0 train state (sampler, phase history), which is layout independent."""
        rng_path = os.path.join(path, f"rng_rank{self.pc.rank}.pt")
        if restore_rng and os.path.isfile(rng_path):
            _set_rng_state(torch.load(rng_path, weights_only=False))
        return torch.load(os.path.join(path, "train_state.pt"), weights_only=False)


def merge_model_checkpoint(path: str, names: Optional[Collection[str]] = None) -> Dict[str, torch.Tensor]:
    """The full (unsharded) model state dict of checkpoint `path`, whatever layout saved it.

    Pipeline stages hold disjoint parameter names (layers keep their global index); tensor-parallel
    shards are joined along their split dimension (`TPShard.join`); replicated tensors are taken from tensor
    rank 0. ``names`` restricts the result to those tensors (files are memory-mapped, so the others are not read).
    """
    layout = checkpoint_layout(path)
    tensor, pipeline = layout.tensor, layout.pipeline
    merged: Dict[str, torch.Tensor] = {}
    for pp_rank in range(pipeline):
        per_tp = []
        for t in range(tensor):
            file = os.path.join(path, model_file(t, pp_rank))
            if not os.path.isfile(file):
                raise FileNotFoundError(
                    f"checkpoint {path}: {model_file(t, pp_rank)} is missing (its {META_FILE} "
                    f"records tensor {tensor} x pipeline {pipeline})"
                )
            per_tp.append(torch.load(file, map_location="cpu", weights_only=False, mmap=True))
        for chunk_index, state in enumerate(per_tp[0]["chunks"]):
            records = per_tp[0]["tp_shards"][chunk_index]
            for name, local in state.items():
                if names is not None and name not in names:
                    continue
                shard = TPShard.from_record(local.shape, records.get(name))
                pieces = [per_tp[t]["chunks"][chunk_index][name] for t in range(shard.size)]
                full = shard.join(pieces)
                merged[name] = full if shard.is_split else full.clone()  # a joined tensor is already a copy
    return merged
