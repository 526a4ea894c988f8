"""Read the model weights of a checkpoint (format in `internlm.checkpoint.files`), whatever layout saved it.

The full tensor of a parameter split over the tensor group is the concatenation of the ranks' pieces along
``dim`` (the file's ``tp_shards`` record ``(dim, rank, size)``); a replicated one is tensor rank 0's. Pipeline
stages and chunks hold disjoint names (layers keep their global index).

Files are opened memory-mapped with weights-only unpickling (`load_file`, `safe_load.load_checkpoint_file`):
only their pickled index is read, and a tensor's bytes are read when it is used. `CheckpointReader.iter_tensors`
yields one full tensor at a time, so a consumer that copies each into place (`InternLM.from_pretrained`, the HF
exporter) never holds the model twice;
`CheckpointReader.pieces` gives the saved pieces of one tensor, which resharding copies into a rank's shards
(`internlm.checkpoint.reshard`). This is the one parser of model files.

This module imports neither the model nor the parallel package: it returns the model config as the dict meta.json
records (``model_config``) and tensors; ``internlm.model.pretrained`` builds the model from them.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .file_io import checkpoint_problems
from .files import META_FILE, complete_checkpoints, is_checkpoint, model_file, read_meta
from .safe_load import load_checkpoint_file


def load_file(path: str, name: str, layout_text: str) -> Any:
    """File ``name`` of checkpoint ``path``, memory-mapped; FileNotFoundError naming it and the layout meta.json
    records (``layout_text``) when it is missing."""
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"checkpoint {path}: {name} is missing (its {META_FILE} records {layout_text})")
    return load_checkpoint_file(file, mmap=True)


def model_file_problems(path: str) -> List[str]:
    """What is wrong with the model files of checkpoint ``path`` against their meta.json records (size, then
    CRC-32), one line per file; empty when they match or the checkpoint predates checksums."""
    files = read_meta(path).get("files")
    if files is None:
        return []
    return checkpoint_problems(path, [name for name in files if name.startswith("model_")])


def find_checkpoint(
    path: str, step: Optional[int] = None, verify: bool = True, warn: Optional[Callable[[str], None]] = None
) -> str:
    """The checkpoint folder ``path`` designates: ``path`` itself when it holds meta.json, else step ``step`` (or
    the newest whose model files pass their checksums, with ``verify``) of ``path/checkpoints/`` (a work_dir) or of
    ``path`` (a checkpoints folder). A damaged checkpoint is reported through ``warn`` (stderr by default) and
    skipped, never changed. Raises FileNotFoundError naming what was looked for."""
    warn = warn or (lambda text: print(f"warning: {text}", file=sys.stderr))
    if is_checkpoint(path):
        if step is not None and int(read_meta(path).get("step", step)) != step:
            raise FileNotFoundError(f"checkpoint {path} is step {read_meta(path)['step']}, not step {step}")
        return path
    root = os.path.join(path, "checkpoints") if complete_checkpoints(os.path.join(path, "checkpoints")) else path
    steps = complete_checkpoints(root)
    if not steps:
        raise FileNotFoundError(
            f"no checkpoint in {path}: expected a step folder with {META_FILE}, a checkpoints folder of them, "
            f"or a work_dir holding checkpoints/"
        )
    if step is not None:
        if step not in steps:
            raise FileNotFoundError(f"{root} has no checkpoint of step {step}; it has steps {steps}")
        return os.path.join(root, str(step))
    for candidate in reversed(steps):
        folder = os.path.join(root, str(candidate))
        problems = model_file_problems(folder) if verify else []
        if not problems:
            return folder
        warn(f"checkpoint {folder} is damaged ({'; '.join(problems)}); trying the previous one")
    raise FileNotFoundError(f"no usable checkpoint in {root}: the model files of every step {steps} are damaged")


def model_config_dict(meta: Dict[str, Any], where: str) -> Dict[str, Any]:
    """The model config recorded in a checkpoint's meta.json (``model_config``, ``InternLMConfig.to_dict()``)."""
    if "model_config" not in meta:
        raise ValueError(f"checkpoint {where}: {META_FILE} records no model_config (saved before it was recorded)")
    return meta["model_config"]


@dataclass
class TensorEntry:
    """Where one full tensor lies: its pieces ``(tp_rank, pp_rank, chunk)`` in tensor-rank order, split along
    ``dim`` (None: replicated, one piece)."""

    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    dim: Optional[int]
    pieces: List[Tuple[int, int, int]]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


class CheckpointReader:
    """The full model tensors of one checkpoint folder (``find_checkpoint`` picks one), read lazily."""

    def __init__(self, path: str, layout_text: Optional[str] = None) -> None:
        """``layout_text``: how a missing file's message names the saved layout (default ``tensor T x pipeline
        P``)."""
        self.path = path
        self.meta = read_meta(path)
        layout = self.meta.get("layout")
        if layout is None:
            raise ValueError(f"checkpoint {path}: {META_FILE} has no 'layout'")
        self.tensor_size, self.pipeline_size = int(layout["tensor"]), int(layout["pipeline"])
        self.layout_text = layout_text or f"tensor {self.tensor_size} x pipeline {self.pipeline_size}"
        self.step = self.meta.get("step")
        self._files: Dict[Tuple[int, int], Any] = {}
        self._entries: Optional[Dict[str, TensorEntry]] = None

    @property
    def model_config(self) -> Dict[str, Any]:
        """meta.json's ``model_config`` (`model_config_dict`)."""
        return model_config_dict(self.meta, self.path)

    def _file(self, tp_rank: int, pp_rank: int) -> Any:
        key = (tp_rank, pp_rank)
        if key not in self._files:
            self._files[key] = load_file(self.path, model_file(tp_rank, pp_rank), self.layout_text)
        return self._files[key]

    def entries(self) -> Dict[str, TensorEntry]:
        """Every tensor of the model, in stage / chunk / state-dict order, from the files' indexes only."""
        if self._entries is None:
            self._entries = {}
            for pp in range(self.pipeline_size):
                saved = self._file(0, pp)
                for chunk, state in enumerate(saved["chunks"]):
                    records = saved["tp_shards"][chunk]
                    for name, local in state.items():
                        record = records.get(name)
                        shape = list(local.shape)
                        if record is None:
                            dim, pieces = None, [(0, pp, chunk)]
                        else:
                            dim, _, size = (int(v) for v in record)
                            shape[dim] *= size
                            pieces = [(t, pp, chunk) for t in range(size)]
                        self._entries[name] = TensorEntry(name, tuple(shape), local.dtype, dim, pieces)
        return self._entries

    def pieces(self, name: str) -> Dict[int, torch.Tensor]:
        """The saved local tensors of ``name`` by tensor rank (memory-mapped), as found in the files: every rank
        of a split tensor, rank 0 of a replicated one. KeyError when the checkpoint has no such tensor."""
        entries = self.entries()
        if name not in entries:
            raise KeyError(f"checkpoint {self.path} has no tensor {name!r}")
        out = {}
        for t, p, c in entries[name].pieces:
            state = self._file(t, p)["chunks"][c]
            if name in state:
                out[t] = state[name]
        return out

    def tensor(self, name: str, copy: bool = False) -> torch.Tensor:
        """The full tensor ``name``: pieces joined along their split dimension (a new tensor), or the replicated
        tensor as mapped from its file (a copy with ``copy``)."""
        entries = self.entries()
        if name not in entries:
            raise KeyError(f"checkpoint {self.path} has no tensor {name!r}")
        entry = entries[name]
        pieces = [self._file(t, p)["chunks"][c][name] for t, p, c in entry.pieces]
        if entry.dim is None:
            return pieces[0].clone() if copy else pieces[0]
        full = torch.cat(pieces, dim=entry.dim)
        if tuple(full.shape) != entry.shape:
            raise ValueError(
                f"checkpoint {self.path}: {name}: joined shape {list(full.shape)} is not {list(entry.shape)}"
            )
        return full

    def iter_tensors(
        self, names: Optional[Sequence[str]] = None, copy: bool = False
    ) -> Iterator[Tuple[str, torch.Tensor]]:
        """``(name, full tensor)`` one at a time, stage by stage (a stage's files are released after it)."""
        wanted = None if names is None else set(names)
        current = None
        for name, entry in self.entries().items():
            stage = entry.pieces[0][1]
            if current is not None and stage != current:
                self._release(current)
            current = stage
            if wanted is None or name in wanted:
                yield name, self.tensor(name, copy=copy)
        self.close()

    def _release(self, stage: int) -> None:
        for key in [k for k in self._files if k[1] == stage]:
            del self._files[key]

    def close(self) -> None:
        self._files.clear()


def recorded_config_files(folder: str) -> List[str]:
    """The run config files checkpoint ``folder`` points to, most specific first: the work_dir's resolved config
    of its phase (``config_<phase_name>.py``), meta.json's ``config_file``, then each recorded phase's file."""
    meta = read_meta(folder)
    work_dir = os.path.dirname(os.path.dirname(os.path.abspath(folder)))
    candidates = [os.path.join(work_dir, f"config_{meta.get('phase_name')}.py"), meta.get("config_file")]
    candidates += [phase.get("file") for phase in reversed(meta.get("phases") or [])]
    return [c for c in candidates if c]


def merge_model_checkpoint(path: str, names: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]:
    """The full (unsharded) model state dict of checkpoint ``path``, whatever layout saved it: an export tool (it
    holds the whole model; resharding a run goes tensor by tensor, `internlm.checkpoint.reshard`). ``names``
    restricts the result to those tensors (files are memory-mapped, so the others are not read)."""
    return dict(CheckpointReader(path).iter_tensors(names, copy=True))


__all__ = [
    "CheckpointReader",
    "TensorEntry",
    "find_checkpoint",
    "load_file",
    "merge_model_checkpoint",
    "model_config_dict",
    "model_file_problems",
    "recorded_config_files",
]
