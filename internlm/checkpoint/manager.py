"""`CheckpointManager`: atomic, verified, resumable checkpoints of a run, ``<save_ckpt_folder>/<step>/``.

The folder's files and meta.json are described in `internlm.checkpoint.files` (docs/checkpoint.md has the
protocol); every file has exactly one writer, and all ranks write at the same time. Each rank writes into
``.tmp-<step>/`` and checksums its files while writing (`file_io.write_file`); the records are gathered to
rank 0, which writes ``meta.json`` and renames the folder to ``<step>/`` (atomic on POSIX file systems). A crash
during a save leaves only a ``.tmp-*`` folder, which is never taken for a checkpoint and is removed by the next
save.

With ``async_save`` the files are written by a background thread per rank from a CPU snapshot taken at the
save point; the gather + ``meta.json`` + rename (collective) happen in `CheckpointManager.finish`, called by
the next save, at the end of training and on a stop. Pruning to ``keep_last`` follows completion.

On resume `internlm.checkpoint.verify.latest_verified_checkpoint` checks the files of the newest complete
checkpoint against their records (spread over the ranks); a damaged one is moved aside and the previous complete
one is used. Loading under another layout: `internlm.checkpoint.reshard`. The folder must be on a file system
that every rank sees.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from internlm.errors import CheckpointSaveError
from internlm.faults import kill_now, kill_point
from internlm.parallel import Layout, param_shards
from internlm.parallel.comm import default_group_barrier, default_group_rank

from .file_io import FileWriter, cpu_snapshot
from .files import (
    META_FILE,
    TMP_PREFIX,
    TRAIN_STATE_FILE,
    checkpoint_healthy,
    commit_checkpoint,
    complete_checkpoints,
    files_table,
    model_file,
    model_writer_dp,
    optim_file,
    rng_file,
    write_json,
    writes_optimizer_file,
)
from .safe_load import load_checkpoint_file


# ---------------------------------------------------------------------- RNG
def _numpy_rng_state() -> Dict[str, Any]:
    """numpy's global RNG state as plain values (``numpy.random.get_state()``'s tuple, its key array as a uint32
    tensor): a file of them loads with weights-only unpickling (safe_load.py)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return dict(
        bit_generator=str(name),
        keys=torch.from_numpy(keys.astype(np.uint32)),
        pos=int(pos),
        has_gauss=int(has_gauss),
        cached_gaussian=float(cached),
    )


def _set_numpy_rng_state(state: Any) -> None:
    """Restore `_numpy_rng_state`'s dict, or the tuple of ``numpy.random.get_state()`` old checkpoints hold."""
    if isinstance(state, dict):
        keys = state["keys"].numpy()
        state = (state["bit_generator"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"])
    np.random.set_state(state)


def _rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": _numpy_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    _set_numpy_rng_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(value: Any) -> Any:
    """JSON for values json does not know (numpy / torch scalars and arrays in a data position)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


_RECORDS_PREFIX = ".records-rank"
_FAILED_PREFIX = ".failed-"
NO_RECORDS = "its records file could not be written or read"


def _remove(path: str) -> None:
    if os.path.exists(path):
        os.remove(path)


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
        writer = getattr(pc, "cp_rank", 0) == 0  # context ranks > 0 hold the same weights and optimizer slices
        if writer and pc.dp_rank == model_writer_dp(pc.layout):
            model = {
                "chunks": [chunk.state_dict() for chunk in model_chunks],
                "tp_shards": [
                    {name: shard.to_record() for name, shard in param_shards(chunk).items()} for chunk in model_chunks
                ],
            }
            files.append((self._model_file(), cpu_snapshot(model) if copy else model))
        if writer and writes_optimizer_file(pc.layout, pc.dp_rank):
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
        tmp = os.path.join(self.root, f"{TMP_PREFIX}{step}")
        setup_error = None
        if self.pc.rank == 0:
            try:
                os.makedirs(self.root, exist_ok=True)
                for name in os.listdir(self.root):
                    if name.startswith(TMP_PREFIX):
                        shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
                    elif name.startswith(_FAILED_PREFIX):
                        os.remove(os.path.join(self.root, name))
                os.makedirs(tmp)
            except OSError as exc:  # reached the barrier all the same: every rank sees the folder is missing
                setup_error = exc
        default_group_barrier()
        if not os.path.isdir(tmp):
            why = f": {setup_error.strerror} (errno {setup_error.errno})" if setup_error is not None else ""
            raise CheckpointSaveError(f"checkpoint {final} was not saved: rank 0 could not create {tmp}{why}")
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
        Returns the checkpoint's path. Raises `CheckpointSaveError` on every rank when any rank failed to write (a
        full disk included: a rank that failed deletes its files, then writes its records file; one that cannot is
        reported by rank 0 as having none); the partial folder is removed and no checkpoint is recorded.

        The records travel through the shared checkpoint folder (``.records-rank{r}.json``, removed before the
        rename) between two barriers, not through ``all_gather_object``: a barrier issued right after a
        collective on Python-owned tensors keeps that collective's work alive on gloo's worker thread, and when
        the process exits just after the last save, that thread then frees Python objects during interpreter
        shutdown and aborts the process ("terminate called without an active exception")."""
        pending = self._pending
        if pending is None:
            return None
        rank, world = self.pc.rank, default_group_rank()[1]
        error = None
        try:
            records = pending.writer.wait()  # a Ctrl-C here leaves the save pending, for `abandon`
        except Exception as exc:  # every rank must reach the barriers, or the others hang
            records, error = {}, f"rank {rank}: {exc}"
            pending.writer.remove_written()  # useless now; frees the room the records file needs on a full disk
        self._pending = None
        if kill_point("save", pending.step):  # tests only: kill -9 in the middle of a save
            kill_now()
        records_file = os.path.join(pending.tmp, f"{_RECORDS_PREFIX}{rank}.json")
        try:
            write_json(records_file, {"records": records, "error": error})
        except OSError:  # a full disk: rank 0 finds no records of this rank and fails the save
            _remove(records_file)
        default_group_barrier()
        failed = os.path.join(self.root, f"{_FAILED_PREFIX}{pending.step}")
        errors: List[str] = []
        if rank == 0:
            errors, gathered = self._collect_records(pending, world, own={"records": records, "error": error})
            _remove(failed)
            if not errors:
                try:
                    commit_checkpoint(pending.tmp, pending.final, pending.meta, gathered)
                except OSError as exc:  # meta.json did not fit
                    errors = [f"rank 0: writing {META_FILE} failed: {exc.strerror} (errno {exc.errno})"]
                else:
                    self._prune()
            if errors:
                shutil.rmtree(pending.tmp, ignore_errors=True)  # first: the failure record needs room
                try:
                    write_json(failed, errors)  # how the other ranks learn of it
                except OSError:
                    _remove(failed)  # they cannot: rank 0's error ends the run, they fail at the next collective
        default_group_barrier()
        if rank != 0 and os.path.exists(failed):
            with open(failed) as f:
                errors = json.load(f)
        if errors:
            raise CheckpointSaveError(
                f"checkpoint {pending.final} was not saved: {'; '.join(errors)}; its partial folder {pending.tmp} "
                f"was removed and the earlier checkpoints are intact"
            )
        return pending.final

    def abandon(self) -> None:
        """Drop the pending save without completing it (a second Ctrl-C): this rank's writer thread is stopped and
        joined (`FileWriter.cancel`), so no thread outlives the run; its ``.tmp-<step>`` folder stays, for the next
        save or the next start-up to remove. Not collective."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.writer.cancel()

    @staticmethod
    def _collect_records(pending: _PendingSave, world: int, own: Dict[str, Any]) -> Tuple[List[str], Dict[str, Any]]:
        """Rank 0: every rank's records file (removed once read; ``own``: rank 0's, in memory) -> (errors,
        meta.json's ``files`` table)."""
        errors: List[str] = []
        gathered = []
        for rank in range(world):
            path = os.path.join(pending.tmp, f"{_RECORDS_PREFIX}{rank}.json")
            try:
                with open(path) as f:
                    entry = json.load(f)
                os.remove(path)
            except (OSError, ValueError) as exc:
                if rank == 0:
                    entry = own
                else:
                    errors.append(f"rank {rank} reported no file records (a full disk? {NO_RECORDS}: {exc})")
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
                f"(see its {META_FILE}); load it with internlm.checkpoint.reshard.load_model_resharded"
            )
        states = load_checkpoint_file(model_path, mmap=True)["chunks"]
        if len(states) != len(model_chunks):
            raise ValueError(f"checkpoint {path} holds {len(states)} model chunks, this run has {len(model_chunks)}")
        for chunk, state in zip(model_chunks, states):
            chunk.load_state_dict(state)

    def load_optimizer(self, path: str, optimizer) -> None:
        """Restore this rank's optimizer shard (the file of its zero1 rank, memory-mapped)."""
        state = load_checkpoint_file(os.path.join(path, self._optim_file()), mmap=True)
        optimizer.load_state_dict(state)

    def load_train_state(self, path: str, restore_rng: bool = True) -> Dict[str, Any]:
        """Restore this rank's RNG states (unless ``restore_rng`` is False: they belong to the saving layout's
        ranks); return the rank-0 train state (sampler, phase history), which is layout independent."""
        rng_path = os.path.join(path, rng_file(self.pc.rank))
        if restore_rng and os.path.isfile(rng_path):
            # numpy arrays allowed: RNG files of checkpoints saved before the states were plain values
            _set_rng_state(load_checkpoint_file(rng_path, legacy_numpy=True))
        return load_checkpoint_file(os.path.join(path, TRAIN_STATE_FILE))


__all__ = ["NO_RECORDS", "CheckpointManager"]
