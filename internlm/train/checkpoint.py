"""Atomic, verified, resumable checkpoints: ``<save_ckpt_folder>/<step>/`` (format in docs/checkpoint.md).

A checkpoint folder holds

    meta.json                    rank 0, last: step, phase, data position, model config, layout, and per file
                                 its size, CRC-32 and writer rank
    train_state.pt               rank 0: data sampler state and phase history (identical on every rank)
    model_tp{t}_pp{p}.pt         model chunks of tensor rank t, pipeline stage p: written by the last data rank
                                 of that (t, p) (a zero1 replica when there is one, which writes no optimizer file)
    optim_tp{t}_pp{p}_dp{z}.pt   optimizer shard of zero1 rank z: written by data rank z (the first zero1 block);
                                 the other blocks hold identical replicas and write nothing
    rng_rank{r}.pt               RNG states of global rank r

so every file has exactly one writer, and all ranks write at the same time. Each rank writes into
``.tmp-<step>/`` and checksums its files while writing; the records are gathered to rank 0, which writes
``meta.json`` and renames the folder to ``<step>/`` (atomic on POSIX file systems). A crash during a save
leaves only a ``.tmp-*`` folder, which is never taken for a checkpoint and is removed by the next save.

With ``async_save`` the files are written by a background thread per rank from a CPU snapshot taken at the
save point; the gather + ``meta.json`` + rename (collective) happen in `CheckpointManager.finish`, called by
the next save, at the end of training and on a stop. Pruning to ``keep_last`` follows completion.

On resume `latest_verified_checkpoint` checks the files of the newest complete checkpoint against their records
(spread over the ranks); a damaged one is reported by file name, moved aside to ``<step>.damaged`` and the
previous complete checkpoint is used; when none is left, nothing is moved and the run stops with a
`CheckpointError` naming every damaged file (the start-up checks, `internlm.train.startup_checks`, also stop a
run on a ``<step>/`` folder holding files but no meta.json, and on a checkpoint of another model). The folder
must be on a file system that every rank sees.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from internlm.parallel import Layout, param_shards

from .checkpoint_io import FileWriter, cpu_snapshot, file_problem
from .errors import CheckpointError
from .faults import kill_now, kill_point

META_FILE = "meta.json"
TRAIN_STATE_FILE = "train_state.pt"
FORMAT_VERSION = 2
DAMAGED_SUFFIX = ".damaged"


# ---------------------------------------------------------------------- collectives (default group)
def _world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _world()[1] > 1:
        dist.barrier()


def _all_gather(obj: Any) -> List[Any]:
    """``obj`` of every rank, in rank order (the default group; its timeout applies)."""
    world = _world()[1]
    if world == 1:
        return [obj]
    out: List[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


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


def checkpoint_problems(path: str, names: Optional[Collection[str]] = None, quick: bool = False) -> List[str]:
    """What is wrong with checkpoint ``path`` (empty: every file matches its size and CRC-32 in meta.json),
    one line per damaged or missing file, naming it. ``names`` restricts the check to those files; ``quick``
    compares sizes only (no file is read). Checkpoints from before checksums (no ``files`` in meta.json) are
    not checked."""
    try:
        meta = read_meta(path)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        return [f"{META_FILE} cannot be read ({exc})"]
    files = meta.get("files")
    if files is None:
        return []
    problems = []
    for name in sorted(files if names is None else names):
        problem = file_problem(path, name, files[name], quick=quick)
        if problem:
            problems.append(problem)
    return problems


def _my_share(path: str, rank: int, world: int) -> List[str]:
    """The problems of the files rank ``rank`` checks: those whose writer rank is ``rank`` modulo ``world``
    (the reading is spread like the writing was); meta.json itself is read by every rank."""
    try:
        files = read_meta(path).get("files") or {}
    except (OSError, ValueError) as exc:
        return [f"{META_FILE} cannot be read ({exc})"]
    mine = [name for name, record in files.items() if int(record.get("writer", 0)) % world == rank]
    return checkpoint_problems(path, mine)


def latest_verified_checkpoint(root: str, warn: Optional[Callable[[str], None]] = None) -> Optional[str]:
    """The newest complete checkpoint under ``root`` whose files all match their checksums, or None when there
    is no complete checkpoint at all.

    Collective when a process group is initialised (every rank checks its share of the files and the problems
    are gathered, so all ranks agree). A damaged checkpoint newer than the one returned is reported through
    ``warn`` with the name of each bad file and what is wrong, and moved aside to ``<step>.damaged`` (kept for
    inspection, never resumed from, pruned or overwritten). Raises `CheckpointError` (a RuntimeError), moving
    nothing, when checkpoints exist but none is usable: a run never silently starts again from step 0.
    """
    rank, world = _world()
    damaged: List[Tuple[str, List[str]]] = []
    usable = None
    for step in reversed(complete_checkpoints(root)):
        path = os.path.join(root, str(step))
        problems = sorted({p for share in _all_gather(_my_share(path, rank, world)) for p in share})
        if not problems:
            usable = path
            break
        damaged.append((path, problems))
    if usable is None and damaged:
        listed = " | ".join(f"{path}: {'; '.join(problems)}" for path, problems in damaged)
        raise CheckpointError(
            f"no usable checkpoint in {root}: every complete checkpoint is damaged ({listed}); restore the files, "
            f"or move the folders out of {root} to start from scratch"
        )
    for path, problems in damaged:
        if warn is not None:
            warn(
                f"checkpoint {path} is damaged: {'; '.join(problems)}; it is moved aside to {path}{DAMAGED_SUFFIX} "
                f"and the run resumes from {usable}"
            )
        if rank == 0:
            aside, n = path + DAMAGED_SUFFIX, 0
            while os.path.exists(aside):  # an older damaged copy of this step is kept too
                n += 1
                aside = f"{path}{DAMAGED_SUFFIX}.{n}"
            os.replace(path, aside)
    if damaged:
        _barrier()
    return usable


def checkpoint_layout(path: str) -> Layout:
    """The layout recorded in checkpoint ``path``'s meta.json."""
    meta = read_meta(path)
    if "layout" not in meta:
        raise ValueError(f"checkpoint {path}: {META_FILE} has no 'layout'; it cannot be resharded")
    try:
        return Layout.from_dict(meta["layout"])
    except ValueError as exc:
        raise ValueError(f"checkpoint {path}: {META_FILE} 'layout': {exc}") from None


# ---------------------------------------------------------------------- RNG
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


def _plain(value: Any) -> Any:
    """JSON for values json does not know (numpy / torch scalars and arrays in a data position)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


_RECORDS_PREFIX = ".records-rank"
_FAILED_PREFIX = ".failed-"


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


@dataclass
class _PendingSave:
    step: int
    tmp: str
    final: str
    meta: Dict[str, Any]
    writer: FileWriter


class CheckpointManager:
    """Saves and loads the training state of every rank, keeping the newest `keep_last` checkpoints."""

    def __init__(self, root: str, pc: Any, keep_last: int = 3) -> None:
        self.root = root
        self.pc = pc
        self.keep_last = keep_last
        self._pending: Optional[_PendingSave] = None

    # ------------------------------------------------------------------ names
    def _model_file(self) -> str:
        return model_file(self.pc.tp_rank, self.pc.pp_rank)

    def _optim_file(self) -> str:
        return optim_file(self.pc.tp_rank, self.pc.pp_rank, self.pc.zero1_rank)

    # ------------------------------------------------------------------ save
    @property
    def pending(self) -> Optional[str]:
        """The final path of a save whose files are being written or not yet committed (None: nothing pending)."""
        return self._pending.final if self._pending is not None else None

    def snapshot(self, model_chunks, optimizer, train_state: Dict[str, Any], copy: bool) -> List[Tuple[str, Any]]:
        """``(file name, object)`` of every file this rank writes (`file_writers`). ``copy``: tensors are CPU
        copies (async saves), else the live tensors, written before training goes on."""
        pc = self.pc
        files: List[Tuple[str, Any]] = []
        if pc.dp_rank == model_writer_dp(pc.layout):
            model = {
                "chunks": [chunk.state_dict() for chunk in model_chunks],
                "tp_shards": [
                    {name: shard.to_record() for name, shard in param_shards(chunk).items()} for chunk in model_chunks
                ],
            }
            files.append((self._model_file(), cpu_snapshot(model) if copy else model))
        if pc.dp_rank < pc.zero1_size:  # the first zero1 block; the others hold the same values
            state = optimizer.state_dict(copy=copy, device="cpu" if copy else None)
            files.append((self._optim_file(), state))
        files.append((rng_file(pc.rank), _rng_state()))
        if pc.rank == 0:
            files.append((TRAIN_STATE_FILE, cpu_snapshot(train_state)))
        return files

    def save(
        self,
        step: int,
        model_chunks,
        optimizer,
        train_state: Dict[str, Any],
        meta: Dict[str, Any],
        async_save: bool = False,
    ) -> str:
        """Save checkpoint ``step`` (collective); returns its final path.

        A save still pending is finished first. With ``async_save`` the call returns once this rank's CPU
        snapshot is taken, while a thread writes the files; the checkpoint exists (meta.json, rename) only after
        `finish`. ``meta`` must hold ``layout`` (``Layout.to_dict()``).
        """
        self.finish()
        # meta as it is now (the trainer keeps changing its phase history); meta.json is written by finish()
        record = json.loads(json.dumps(meta, default=_plain))
        final = os.path.join(self.root, str(step))
        tmp = os.path.join(self.root, f".tmp-{step}")
        if self.pc.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            for name in os.listdir(self.root):
                if name.startswith((".tmp-", _FAILED_PREFIX)):
                    shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
            os.makedirs(tmp)
        _barrier()
        files = self.snapshot(model_chunks, optimizer, train_state, copy=async_save)
        writer = FileWriter(tmp, files, background=async_save)
        del files
        self._pending = _PendingSave(step, tmp, final, record, writer)
        if not async_save:
            self.finish()
        return final

    def finish(self) -> Optional[str]:
        """Complete the pending save (collective; a no-op returning None when there is none): wait for this
        rank's writer, hand its file records to rank 0, which writes meta.json, renames the folder and prunes.
        Returns the checkpoint's path. Raises RuntimeError on every rank when any rank failed to write (the
        partial folder is removed; no checkpoint is recorded).

        The records travel through the shared checkpoint folder (``.records-rank{r}.json``, removed before the
        rename) between two barriers, not through ``all_gather_object``: a barrier issued right after a
        collective on Python-owned tensors keeps that collective's work alive on gloo's worker thread, and when
        the process exits just after the last save, that thread then frees Python objects during interpreter
        shutdown and aborts the process ("terminate called without an active exception")."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        rank, world = self.pc.rank, _world()[1]
        error = None
        try:
            records = pending.writer.wait()
        except Exception as exc:  # every rank must reach the barriers, or the others hang
            records, error = {}, f"rank {rank}: {exc}"
        if kill_point("save", pending.step):  # tests only: kill -9 in the middle of a save
            kill_now()
        _write_json(os.path.join(pending.tmp, f"{_RECORDS_PREFIX}{rank}.json"), {"records": records, "error": error})
        _barrier()
        failed = os.path.join(self.root, f"{_FAILED_PREFIX}{pending.step}")
        if rank == 0:
            errors, gathered = self._collect_records(pending, world)
            if errors:
                _write_json(failed, errors)
                shutil.rmtree(pending.tmp, ignore_errors=True)
            else:
                if os.path.exists(failed):
                    os.remove(failed)
                commit_checkpoint(pending.tmp, pending.final, pending.meta, gathered)
                self._prune()
        _barrier()
        if os.path.exists(failed):
            with open(failed) as f:
                errors = json.load(f)
            raise RuntimeError(f"checkpoint {pending.final} was not saved: {'; '.join(errors)}")
        return pending.final

    @staticmethod
    def _collect_records(pending: _PendingSave, world: int) -> Tuple[List[str], Dict[str, Any]]:
        """Rank 0: every rank's records file (removed once read) -> (errors, meta.json's ``files`` table)."""
        errors: List[str] = []
        gathered = []
        for rank in range(world):
            path = os.path.join(pending.tmp, f"{_RECORDS_PREFIX}{rank}.json")
            try:
                with open(path) as f:
                    entry = json.load(f)
                os.remove(path)
            except (OSError, ValueError) as exc:
                errors.append(f"rank {rank} reported no file records ({exc})")
                continue
            if entry["error"]:
                errors.append(entry["error"])
            gathered.append((rank, entry["records"]))
        if errors:
            return errors, {}
        try:
            return [], files_table(gathered, Layout.from_dict(pending.meta["layout"]))
        except RuntimeError as exc:
            return [str(exc)], {}

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` checkpoints, and always the newest healthy one (meta.json ``health``,
        see internlm/train/health.py): pruning never leaves only checkpoints marked unhealthy."""
        if self.keep_last <= 0:
            return
        steps = complete_checkpoints(self.root)
        healthy = [step for step in steps if checkpoint_healthy(os.path.join(self.root, str(step)))]
        for step in steps[: max(0, len(steps) - self.keep_last)]:
            if healthy and step == healthy[-1]:
                continue
            shutil.rmtree(os.path.join(self.root, str(step)), ignore_errors=True)

    # ------------------------------------------------------------------ load (same layout: own files only)
    def load_model(self, path: str, model_chunks) -> None:
        """Restore this rank's model chunks from its own model file of checkpoint `path` (memory-mapped: values
        go from the file's pages into the parameters)."""
        model_path = os.path.join(path, self._model_file())
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"checkpoint {path} has no {self._model_file()}: it was saved under another parallel layout "
                f"(see its {META_FILE}); load it with internlm.train.reshard.load_model_resharded"
            )
        states = torch.load(model_path, map_location="cpu", weights_only=False, mmap=True)["chunks"]
        if len(states) != len(model_chunks):
            raise ValueError(f"checkpoint {path} holds {len(states)} model chunks, this run has {len(model_chunks)}")
        for chunk, state in zip(model_chunks, states):
            chunk.load_state_dict(state)

    def load_optimizer(self, path: str, optimizer) -> None:
        """Restore this rank's optimizer shard (the file of its zero1 rank, memory-mapped)."""
        state = torch.load(os.path.join(path, self._optim_file()), map_location="cpu", weights_only=False, mmap=True)
        optimizer.load_state_dict(state)

    def load_train_state(self, path: str, restore_rng: bool = True) -> Dict[str, Any]:
        """Restore this rank's RNG states (unless ``restore_rng`` is False: they belong to the saving layout's
        ranks); return the rank-0 train state (sampler, phase history), which is layout independent."""
        rng_path = os.path.join(path, rng_file(self.pc.rank))
        if restore_rng and os.path.isfile(rng_path):
            _set_rng_state(torch.load(rng_path, weights_only=False))
        return torch.load(os.path.join(path, TRAIN_STATE_FILE), weights_only=False)


def merge_model_checkpoint(path: str, names: Optional[Collection[str]] = None) -> Dict[str, torch.Tensor]:
    """The full (unsharded) model state dict of checkpoint `path`, whatever layout saved it: an export tool
    (it holds the whole model; resharding a run goes tensor by tensor, `internlm.train.reshard`).

    Pipeline stages hold disjoint parameter names (layers keep their global index); tensor-parallel
    shards are joined along their split dimension (`TPShard.join`); replicated tensors are taken from tensor
    rank 0. ``names`` restricts the result to those tensors (files are memory-mapped, so the others are not read).
    """
    from internlm.model.checkpoint_reader import merged_state_dict  # the one reader of the model files

    return merged_state_dict(path, names)
