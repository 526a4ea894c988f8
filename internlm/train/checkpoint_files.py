"""The files of a checkpoint folder ``<save_ckpt_folder>/<step>/``: their names, the rank that writes each,
reading meta.json, finding complete checkpoints, and the commit (meta.json, then the rename of ``.tmp-<step>/``).

The folder's format and the save / resume protocol: `internlm.train.checkpoint` and docs/checkpoint.md.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from internlm.parallel import Layout

META_FILE = "meta.json"
TRAIN_STATE_FILE = "train_state.pt"
FORMAT_VERSION = 2
DAMAGED_SUFFIX = ".damaged"


# ---------------------------------------------------------------------- names and writers
def model_file(tp_rank: int, pp_rank: int) -> str:
    """Model chunks of tensor rank ``tp_rank`` and pipeline stage ``pp_rank``."""
    return f"model_tp{tp_rank}_pp{pp_rank}.pt"


def optim_file(tp_rank: int, pp_rank: int, zero1_rank: int) -> str:
    """Optimizer shard of zero1 rank ``zero1_rank`` at tensor rank ``tp_rank``, pipeline stage ``pp_rank``
    (the same values on every zero1 block: data ranks ``zero1_rank + k * zero1``)."""
    return f"optim_tp{tp_rank}_pp{pp_rank}_dp{zero1_rank}.pt"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def model_writer_dp(layout: Layout) -> int:
    """The data rank that writes the model files: the last one, a zero1 replica (which writes no optimizer
    shard) whenever ``data > zero1``."""
    return layout.data - 1


def file_writers(layout: Layout) -> Dict[str, int]:
    """Every file (but meta.json) of a checkpoint saved under ``layout``, with the global rank that writes it."""
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
def complete_checkpoints(root: str) -> List[int]:
    """Steps of the complete checkpoints under `root` (a ``<step>/`` folder with meta.json), oldest first."""
    if not os.path.isdir(root):
        return []
    steps = []
    for name in os.listdir(root):
        if name.isdigit() and os.path.isfile(os.path.join(root, name, META_FILE)):
            steps.append(int(name))
    return sorted(steps)


def latest_checkpoint(root: str) -> Optional[str]:
    """The newest complete checkpoint under ``root`` (not verified: see `latest_verified_checkpoint`)."""
    steps = complete_checkpoints(root)
    return os.path.join(root, str(steps[-1])) if steps else None


def read_meta(path: str) -> Dict[str, Any]:
    with open(os.path.join(path, META_FILE)) as f:
        return json.load(f)


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


def checkpoint_layout(path: str) -> Layout:
    """The layout recorded in checkpoint ``path``'s meta.json."""
    meta = read_meta(path)
    if "layout" not in meta:
        raise ValueError(f"checkpoint {path}: {META_FILE} has no 'layout'; it cannot be resharded")
    try:
        return Layout.from_dict(meta["layout"])
    except ValueError as exc:
        raise ValueError(f"checkpoint {path}: {META_FILE} 'layout': {exc}") from None


# ---------------------------------------------------------------------- committing
def files_table(gathered: Sequence[Tuple[int, Mapping[str, Mapping[str, Any]]]], layout: Layout) -> Dict[str, Any]:
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
    record = dict(meta, files=dict(files))
    with open(os.path.join(tmp, META_FILE), "w") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if os.path.isdir(final):  # re-saving a step (e.g. after an edited phase): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
