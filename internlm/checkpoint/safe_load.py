"""Reading checkpoint files without running code from them: the one ``torch.load`` of the package.

Every ``.pt`` file of a checkpoint is a ``torch.save`` zip whose ``data.pkl`` is a pickle, and a pickle can name any
callable (``os.system``, ``builtins.exec``...) to be called while it is read. Checkpoints are shared and downloaded,
so `load_checkpoint_file` reads them with ``torch.load(weights_only=True)``: the unpickler builds only tensors,
storages, ``dict`` / ``OrderedDict`` / ``list`` / ``tuple`` / ``set``, numbers, strings, ``None`` and
``torch.dtype`` / ``torch.Size``. That is everything the files of this format hold (docs/checkpoint.md), with one
exception kept readable for old checkpoints:

* ``rng_rank{r}.pt`` written before the RNG states were stored as plain values holds numpy's RNG state, a tuple
  with a ``uint32`` numpy array (``numpy.random.get_state()``). Those files (``legacy_numpy=True``) are read with
  exactly the globals a ``uint32`` array needs allow-listed (`NUMPY_ARRAY_GLOBALS`: numpy's ``_reconstruct``,
  ``ndarray``, ``dtype`` and its ``uint32`` class, under numpy 1's and numpy 2's module names), for that read only.

A file that needs anything else raises `UnsafeCheckpointFile` (a `CheckpointError`: train.py prints one line and
exits 2) naming the file and the globals its pickle asks for; nothing from it has run.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from typing import Any, Iterable, List

import numpy as np
import torch

from internlm.errors import CheckpointError

_numpy_reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's own array constructor, whatever its module

# (object, the name a pickle may give it): numpy 2 pickles numpy._core.multiarray._reconstruct, numpy 1 numpy.core...
NUMPY_ARRAY_GLOBALS = [
    (_numpy_reconstruct, "numpy._core.multiarray._reconstruct"),
    (_numpy_reconstruct, "numpy.core.multiarray._reconstruct"),
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),  # numpy 2's dtype class of the key array (numpy.dtypes.UInt32DType)
]


class UnsafeCheckpointFile(CheckpointError):
    """A checkpoint file whose pickle needs globals that weights-only loading refuses (it could run code)."""


def _globals_named(path: str, error: str) -> List[str]:
    """The globals the pickle of ``path`` asks for beyond the allowed ones (a static scan, nothing runs), or what
    weights-only loading reported."""
    try:
        found = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a torch zip, cut short...: the unpickler's own words
        found = []
    if not found:
        match = re.search(r"GLOBAL (\S+)", error)
        found = [match.group(1) if match else "something weights-only loading refuses"]
    return found


def _refusal(path: str, names: List[str], local: bool) -> UnsafeCheckpointFile:
    return UnsafeCheckpointFile(
        f"checkpoint file {path} was refused: its pickle calls {', '.join(names[:4])}, which a checkpoint of this "
        f"framework never holds and which could run code on loading; nothing from it was run. Do not use it: take "
        f"another checkpoint, or, only if you trust its source, re-save its tensors in plain dicts with torch.save",
        local=local,
    )


def check_checkpoint_files(folder: str, names: Iterable[str]) -> None:
    """Start-up's early refusal (rank 0, before any rank loads): raise `UnsafeCheckpointFile` for the first file of
    ``names`` in checkpoint ``folder`` whose pickle names a global weights-only loading refuses (a static scan of its
    ``data.pkl``, nothing runs; RNG files may hold numpy arrays). Missing or unreadable files are left to the
    checksum checks; the load itself refuses whatever a static scan cannot see."""
    for name in sorted(names):
        path = os.path.join(folder, name)
        if not name.endswith(".pt") or not os.path.isfile(path):
            continue
        legacy = name.startswith("rng_rank")
        allowed = torch.serialization.safe_globals(NUMPY_ARRAY_GLOBALS) if legacy else contextlib.nullcontext()
        try:
            with allowed:
                found = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # not a torch zip: the load reports it
            continue
        if found:
            raise _refusal(path, found, local=False)


def load_checkpoint_file(path: str, mmap: bool = False, legacy_numpy: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU (memory-mapped with ``mmap``); ``legacy_numpy``: numpy
    arrays allowed as well (old RNG files, see the module docstring). Raises `UnsafeCheckpointFile` (local to this
    rank: the file may be this rank's alone) when the pickle needs anything else."""
    allowed = torch.serialization.safe_globals(NUMPY_ARRAY_GLOBALS) if legacy_numpy else contextlib.nullcontext()
    try:
        with allowed:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise _refusal(path, _globals_named(path, str(exc)), local=True) from None


__all__ = ["NUMPY_ARRAY_GLOBALS", "UnsafeCheckpointFile", "check_checkpoint_files", "load_checkpoint_file"]
