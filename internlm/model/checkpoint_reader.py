"""Read the model weights of a training checkpoint (format in docs/checkpoint.md), whatever layout saved it.

A checkpoint ``<root>/<step>/`` holds ``meta.json`` (layout, model config, CRC-32 per file) and one model file
per tensor rank t and pipeline stage p, ``model_tp{t}_pp{p}.pt`` = ``{"chunks": [state dict per chunk],
"tp_shards": [{name: (dim, rank, size) or None}]}``. The full tensor of a parameter split over the tensor group
is the concatenation of the ranks' pieces along ``dim``; a replicated one is tensor rank 0's. Pipeline stages and
chunks hold disjoint names (layers keep their global index).

Files are opened with ``torch.load(..., mmap=True)``: only their pickled index is read, and a tensor's bytes are
read when it is used. `CheckpointReader.iter_tensors` yields one full tensor at a time, so a consumer that copies
each into place (`InternLM.from_pretrained`, the HF exporter) never holds the model twice.

This module reads the format without importing ``internlm.train`` (the model package must not depend on the
trainer); the file names and meta.json fields are the trainer's (``internlm/train/checkpoint.py``).
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .config import InternLMConfig

META_FILE = "meta.json"
_BLOCK = 8 * 1024 * 1024


def model_file(tp_rank: int, pp_rank: int) -> str:
    """Model chunks of tensor rank ``tp_rank`` and pipeline stage ``pp_rank`` (the trainer's name)."""
    return f"model_tp{tp_rank}_pp{pp_rank}.pt"


def is_checkpoint(path: str) -> bool:
    """``path`` is one complete checkpoint (a folder holding meta.json)."""
    return os.path.isfile(os.path.join(path, META_FILE))


def complete_steps(root: str) -> List[int]:
    """Steps of the complete checkpoints (``<step>/meta.json``) under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    return sorted(int(n) for n in os.listdir(root) if n.isdigit() and is_checkpoint(os.path.join(root, n)))


def _read_meta(path: str) -> Dict[str, Any]:
    with open(os.path.join(path, META_FILE)) as f:
        return json.load(f)


def model_file_problems(path: str) -> List[str]:
    """What is wrong with the model files of checkpoint ``path`` against their meta.json records (size, then
    CRC-32 read in 8 MiB blocks), one line per file; empty when they match or the checkpoint predates checksums."""
    files = _read_meta(path).get("files")
    if files is None:
        return []
    problems = []
    for name in sorted(n for n in files if n.startswith("model_")):
        file, record = os.path.join(path, name), files[name]
        if not os.path.isfile(file):
            problems.append(f"{name} is missing")
            continue
        if os.path.getsize(file) != record["bytes"]:
            problems.append(f"{name} has {os.path.getsize(file)} bytes, {record['bytes']} were written")
            continue
        crc = 0
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(_BLOCK), b""):
                crc = zlib.crc32(block, crc)
        if f"{crc & 0xFFFFFFFF:08x}" != record["crc32"]:
            problems.append(f"{name} fails its checksum (crc32 {crc & 0xFFFFFFFF:08x}, {record['crc32']} was written)")
    return problems


def find_checkpoint(
    path: str, step: Optional[int] = None, verify: bool = True, warn: Optional[Callable[[str], None]] = None
) -> str:
    """The checkpoint folder ``path`` designates: ``path`` itself when it holds meta.json, else step ``step`` (or
    the newest whose model files pass their checksums, with ``verify``) of ``path/checkpoints/`` (a work_dir) or of
    ``path`` (a checkpoints folder). A damaged checkpoint is reported through ``warn`` (stderr by default) and
    skipped, never changed. Raises FileNotFoundError naming what was looked for."""
    warn = warn or (lambda text: print(f"warning: {text}", file=sys.stderr))
    if is_checkpoint(path):
        if step is not None and int(_read_meta(path).get("step", step)) != step:
            raise FileNotFoundError(f"checkpoint {path} is step {_read_meta(path)['step']}, not step {step}")
        return path
    root = os.path.join(path, "checkpoints") if complete_steps(os.path.join(path, "checkpoints")) else path
    steps = complete_steps(root)
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


def config_from_meta(meta: Dict[str, Any], where: str) -> InternLMConfig:
    """The `InternLMConfig` recorded in a checkpoint's meta.json (``model_config``)."""
    if "model_config" not in meta:
        raise ValueError(f"checkpoint {where}: {META_FILE} records no model_config (saved before it was recorded)")
    try:
        return InternLMConfig.from_dict(meta["model_config"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint {where}: {META_FILE} model_config: {exc}") from None


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

    def __init__(self, path: str) -> None:
        self.path = path
        self.meta = _read_meta(path)
        layout = self.meta.get("layout")
        if layout is None:
            raise ValueError(f"checkpoint {path}: {META_FILE} has no 'layout'")
        self.tensor_size, self.pipeline_size = int(layout["tensor"]), int(layout["pipeline"])
        self.step = self.meta.get("step")
        self._files: Dict[Tuple[int, int], Any] = {}
        self._entries: Optional[Dict[str, TensorEntry]] = None

    @property
    def config(self) -> InternLMConfig:
        return config_from_meta(self.meta, self.path)

    def _file(self, tp_rank: int, pp_rank: int) -> Any:
        key = (tp_rank, pp_rank)
        if key not in self._files:
            name = model_file(tp_rank, pp_rank)
            file = os.path.join(self.path, name)
            if not os.path.isfile(file):
                raise FileNotFoundError(
                    f"checkpoint {self.path}: {name} is missing (its {META_FILE} records tensor {self.tensor_size} "
                    f"x pipeline {self.pipeline_size})"
                )
            self._files[key] = torch.load(file, map_location="cpu", weights_only=False, mmap=True)
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


def merged_state_dict(path: str, names: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]:
    """The full model state dict of checkpoint ``path`` (every tensor in memory: an export helper)."""
    return dict(CheckpointReader(path).iter_tensors(names, copy=True))


__all__ = [
    "CheckpointReader",
    "TensorEntry",
    "complete_steps",
    "config_from_meta",
    "find_checkpoint",
    "is_checkpoint",
    "merged_state_dict",
    "model_file",
    "model_file_problems",
]
