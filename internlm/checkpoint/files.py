"""The checkpoint format: a folder's file names, their writer ranks, meta.json, and finding checkpoints.

A checkpoint is the folder ``<root>/<step>/`` (``root``: ``ckpt.save_ckpt_folder``) holding

    meta.json                    rank 0, last: the record below
    train_state.pt               rank 0: data sampler state and phase history (identical on every rank)
    model_tp{t}_pp{p}.pt         model chunks of tensor rank t, pipeline stage p: written by the last data rank
                                 of that (t, p) (a zero1 replica when there is one, which writes no optimizer file);
                                 ``{"chunks": [state dict per chunk], "tp_shards": [{name: (dim, rank, size) or
                                 None}]}``, the full tensor of a split one is its tensor ranks' pieces joined on
                                 ``dim``, a replicated one (None) is tensor rank 0's
    optim_tp{t}_pp{p}_dp{z}.pt   optimizer shard of zero1 rank z (format in internlm/optim/shard_state.py): written
                                 by data rank z (the first zero1 block); the other blocks hold identical replicas
    rng_rank{r}.pt               RNG states of global rank r (torch, numpy, python, CUDA)

so every file has exactly one writer (`file_writers`). A folder counts as a checkpoint only when it is named by its
step and holds meta.json (`complete_checkpoints`); a save in progress lives in ``.tmp-<step>/`` and becomes
``<step>/`` by one rename after meta.json is written (`commit_checkpoint`); a damaged one is moved aside to
``<step>.damaged`` (`internlm.checkpoint.verify`).

meta.json (JSON object; written with `write_json`, the one fsync-ing JSON writer of the package):

    version                       2 (a checkpoint without ``files`` predates checksums and is not verified)
    step, tokens                  optimizer updates and tokens consumed so far, over all phases
    phase_index, phase_name,      the phase and its step; its length, whether it is complete, its tokens so far
    phase_step, phase_steps,
    phase_completed, phase_tokens
    phases, config_file           the history of started phases (name, file, steps, fingerprint), this phase's file
    layout                        ``Layout.to_dict()``: world size, tensor, pipeline, data, zero1, chunks, sp
    model_config                  ``InternLMConfig.to_dict()`` of the run
    data                          the data position (the sampler state, as in train_state.pt)
    files                         ``{name: {"bytes": n, "crc32": "8 hex digits", "writer": global rank}}`` for
                                  every other file (`files_table`; CRC-32 of `internlm.checkpoint.file_io`)
    health                        ``healthy`` (false, with ``reason``, once marked unhealthy), ``nonfinite_steps``,
                                  ``loss_spikes``, ``rollbacks`` (internlm/train/health.py)
    skip_batches                  the global steps whose batches are skipped (``'5-10,20'``)
    source                        (imports only, tools/convert_from_hf.py) ``{"hf": folder}``

``health`` and ``skip_batches`` may be rewritten later (`rewrite_meta`, atomic); meta.json is not among the
checksummed files. This module imports neither the model nor the parallel package (a layout is used through its
attributes), so the model's ``from_pretrained`` can read checkpoints through it. docs/checkpoint.md has the
save / resume protocol.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

META_FILE = "meta.json"
TRAIN_STATE_FILE = "train_state.pt"
FORMAT_VERSION = 2
DAMAGED_SUFFIX = ".damaged"
TMP_PREFIX = ".tmp-"  # a save in progress: .tmp-<step>/


# ---------------------------------------------------------------------- names and writers
def model_file(tp_rank: int, pp_rank: int) -> str:
    """Model chunks of tensor rank ``tp_rank`` and pipeline stage ``pp_rank``."""
    return f"model_tp{tp_rank}_pp{pp_rank}.pt"


def optim_file(tp_rank: int, pp_rank: int, zero1_rank: int) -> str:
    """Optimizer shard of zero1 rank ``zero1_rank`` at tensor rank ``tp_rank``, pipeline stage ``pp_rank``
    (the same values on every zero1 block: data ranks ``zero1_rank + k * zero1``)."""
    return f"optim_tp{tp_rank}_pp{pp_rank}_dp{zero1_rank}.pt"


def rng_file(rank: int) -> str:
    """RNG states of global rank ``rank``."""
    return f"rng_rank{rank}.pt"


def model_writer_dp(layout: Any) -> int:
    """The data rank that writes the model files (``layout``: a `Layout`): the last one, a zero1 replica (which
    writes no optimizer shard) whenever ``data > zero1``."""
    return layout.data - 1


def writes_optimizer_file(layout: Any, dp_rank: int) -> bool:
    """Whether data rank ``dp_rank`` writes optimizer shard files: the first zero1 block (the other blocks hold the
    same values)."""
    return dp_rank < layout.zero1


def file_writers(layout: Any) -> Dict[str, int]:
    """Every file (but meta.json) of a checkpoint saved under ``layout`` (a `Layout`), with the global rank that
    writes it."""
    out = {TRAIN_STATE_FILE: 0}
    for p in range(layout.pipeline):
        for t in range(layout.tensor):
            out[model_file(t, p)] = layout.rank_of(t, model_writer_dp(layout), p)
            for z in range(layout.zero1):
                out[optim_file(t, p, z)] = layout.rank_of(t, z, p)
    for r in range(layout.world_size):
        out[rng_file(r)] = r
    return out


# ---------------------------------------------------------------------- finding checkpoints
def is_checkpoint(path: str) -> bool:
    """``path`` is one complete checkpoint (a folder holding meta.json)."""
    return os.path.isfile(os.path.join(path, META_FILE))


def complete_checkpoints(root: str) -> List[int]:
    """Steps of the complete checkpoints under `root` (a ``<step>/`` folder with meta.json), oldest first."""
    if not os.path.isdir(root):
        return []
    return sorted(int(name) for name in os.listdir(root) if name.isdigit() and is_checkpoint(os.path.join(root, name)))


def partial_saves(root: str) -> List[Tuple[str, int]]:
    """``(path, bytes held)`` of every ``.tmp-<step>`` folder under ``root``: a save that did not complete (killed,
    or failed without cleaning up), never a checkpoint; the next save removes them."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.startswith(TMP_PREFIX) and os.path.isdir(path):
            held = 0
            for folder, _, files in os.walk(path):
                held += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
            out.append((path, held))
    return out


def accounted_bytes(path: str) -> Optional[int]:
    """The bytes of checkpoint ``path``'s files as its meta.json records them (``files``; meta.json itself, a few
    KB, left out), None when it records none (before checksums) or cannot be read."""
    try:
        files = read_meta(path).get("files")
        return sum(int(record["bytes"]) for record in files.values()) if isinstance(files, dict) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def latest_checkpoint(root: str) -> Optional[str]:
    """The newest complete checkpoint under ``root`` (not verified: see `latest_verified_checkpoint`)."""
    steps = complete_checkpoints(root)
    return os.path.join(root, str(steps[-1])) if steps else None


# ---------------------------------------------------------------------- meta.json
def read_meta(path: str) -> Dict[str, Any]:
    """Checkpoint ``path``'s meta.json (raises OSError / ValueError when it cannot be read)."""
    with open(os.path.join(path, META_FILE)) as f:
        return json.load(f)


def write_json(path: str, obj: Any, indent: Optional[int] = None, atomic: bool = False) -> None:
    """``obj`` as JSON into ``path``, flushed to disk (fsync) before returning. ``atomic``: written to
    ``path + ".tmp"`` and renamed over ``path``, so a reader sees the old or the new file, never a cut one."""
    target = path + ".tmp" if atomic else path
    with open(target, "w") as f:
        json.dump(obj, f, indent=indent)
        f.flush()
        os.fsync(f.fileno())
    if atomic:
        os.replace(target, path)


def rewrite_meta(path: str, meta: Mapping[str, Any]) -> None:
    """Replace checkpoint ``path``'s meta.json with ``meta``, atomically (health marks, rollback records)."""
    write_json(os.path.join(path, META_FILE), meta, indent=1, atomic=True)


def checkpoint_healthy(path: str) -> bool:
    """Whether checkpoint ``path``'s meta.json records it as healthy (``health.healthy``, written by the trainer,
    see internlm/train/health.py; a checkpoint from before health records counts as healthy, one whose meta.json
    cannot be read does not)."""
    try:
        meta = read_meta(path)
    except (OSError, ValueError):
        return False
    health = meta.get("health") if isinstance(meta, dict) else None
    return isinstance(meta, dict) and (not isinstance(health, dict) or bool(health.get("healthy", True)))


# ---------------------------------------------------------------------- committing
def files_table(gathered: Sequence[Tuple[int, Mapping[str, Mapping[str, Any]]]], layout: Any) -> Dict[str, Any]:
    """meta.json's ``files``: ``{name: {bytes, crc32, writer}}`` from every rank's ``(rank, records)``.

    Raises RuntimeError when two ranks wrote one file, or a file of ``layout`` (`file_writers`) is missing.
    """
    files: Dict[str, Any] = {}
    for rank, records in gathered:
        for name, record in records.items():
            if name in files:
                raise RuntimeError(f"checkpoint file {name} was written by ranks {files[name]['writer']} and {rank}")
            files[name] = dict(record, writer=rank)
    missing = sorted(set(file_writers(layout)) - set(files))
    if missing:
        raise RuntimeError(f"checkpoint files not written by any rank: {', '.join(missing)}")
    return dict(sorted(files.items()))


def commit_checkpoint(tmp: str, final: str, meta: Mapping[str, Any], files: Mapping[str, Any]) -> None:
    """Rank 0's part of finishing a save: meta.json (with the ``files`` table) into ``tmp``, then the rename of
    ``tmp`` to ``final`` (replacing a checkpoint of the same step)."""
    write_json(os.path.join(tmp, META_FILE), dict(meta, files=dict(files)), indent=1)
    if os.path.isdir(final):  # re-saving a step (e.g. after an edited phase): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)


__all__ = [
    "DAMAGED_SUFFIX",
    "FORMAT_VERSION",
    "META_FILE",
    "TMP_PREFIX",
    "TRAIN_STATE_FILE",
    "accounted_bytes",
    "checkpoint_healthy",
    "commit_checkpoint",
    "complete_checkpoints",
    "file_writers",
    "files_table",
    "is_checkpoint",
    "latest_checkpoint",
    "model_file",
    "model_writer_dp",
    "optim_file",
    "partial_saves",
    "read_meta",
    "rewrite_meta",
    "rng_file",
    "write_json",
]
