"""Checkpoint format: one writer per file, checksums and the fallback past damaged checkpoints, async saves.

End to end through train.py (tiny model of train_utils.TINY_BASE): the bytes of a dp4 x zero1 2 checkpoint
against a single process's, exact resume with ``ckpt.async_save``, a corrupted or missing file in the newest
checkpoint. Unit level (one process, `CheckpointManager` on a tiny model): what an async save does before it
completes, write failures, the error when no checkpoint is usable.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from internlm.checkpoint import (
    DAMAGED_SUFFIX,
    META_FILE,
    checkpoint_problems,
    complete_checkpoints,
    file_writers,
    merge_model_checkpoint,
    read_meta,
)
from internlm.checkpoint.manager import CheckpointManager
from internlm.checkpoint.verify import latest_verified_checkpoint
from internlm.parallel import Layout
from internlm.train.run import EXIT_STOPPED
from train_utils import relative_distance, request_stop, run_train, step_losses, write_base
from zero_utils import make_opt, tiny_model, train_zero


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))


def _assert_same_losses(a, b, steps):
    for step in steps:
        assert abs(a[step] - b[step]) <= 1e-6 * abs(a[step]), (step, a[step], b[step])


class _Recorder:
    """Stands in for a model chunk or an optimizer: takes a state dict and keeps its keys."""

    def load_state_dict(self, state):
        self.keys = list(state)


def _files_read_on_resume(path: str, layout: Layout, rank: int, monkeypatch) -> list:
    """The files `CheckpointManager` opens to resume rank ``rank`` of ``layout`` from ``path``."""
    tp_rank, dp_rank, pp_rank = layout.coords(rank)
    pc = SimpleNamespace(
        layout=layout,
        rank=rank,
        tp_rank=tp_rank,
        dp_rank=dp_rank,
        pp_rank=pp_rank,
        zero1_rank=dp_rank % layout.zero1,
        zero1_size=layout.zero1,
    )
    opened = []
    real_load = torch.load

    def spy(file, *args, **kwargs):
        opened.append(os.path.basename(file))
        return real_load(file, *args, **kwargs)

    rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    with monkeypatch.context() as patch:
        patch.setattr(torch, "load", spy)
        manager = CheckpointManager(os.path.dirname(path), pc)
        manager.load_model(path, [_Recorder()])
        manager.load_optimizer(path, _Recorder())
        manager.load_train_state(path)
    torch.set_rng_state(rng[0])
    np.random.set_state(rng[1])
    random.setstate(rng[2])
    return opened


# ---------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_dp4_zero1_2_checkpoint_has_single_process_bytes_and_one_writer_per_file(tmp_path, demo_data, monkeypatch):
    """Hybrid ZeRO (dp 4, zero1 2): the two zero1 blocks hold identical optimizer replicas, only the first
    writes them, so the checkpoint has the single-process checkpoint's bytes (+ per-rank RNG files)."""
    single_dir, dp4_dir = str(tmp_path / "single"), str(tmp_path / "dp4")
    run_train([write_base(str(tmp_path / "cfg1"), demo_data, single_dir)], sets=["data.total_steps=3"])
    # global batch 4 x 2 x 1 = 8 sequences, as the single process's 1 x 2 x 4
    dp4_sets = ["parallel.zero1=2", "data.micro_num=1", "data.total_steps=3"]
    run_train([write_base(str(tmp_path / "cfg4"), demo_data, dp4_dir)], nproc=4, sets=dp4_sets)
    single, dp4 = (os.path.join(d, "checkpoints", "3") for d in (single_dir, dp4_dir))

    single_bytes, dp4_bytes = _folder_bytes(single), _folder_bytes(dp4)
    print(f"checkpoint bytes: single process {single_bytes}, dp4 zero1 2 {dp4_bytes}")
    assert abs(dp4_bytes - single_bytes) <= 0.05 * single_bytes, (single_bytes, dp4_bytes)

    meta = read_meta(dp4)
    layout = Layout.from_dict(meta["layout"])
    assert (layout.data, layout.zero1) == (4, 2)
    files = meta["files"]
    assert set(files) == set(os.listdir(dp4)) - {META_FILE}  # every file on disk is recorded, and only those
    assert {name: record["writer"] for name, record in files.items()} == file_writers(layout)
    assert sorted(n for n in files if n.startswith("optim")) == ["optim_tp0_pp0_dp0.pt", "optim_tp0_pp0_dp1.pt"]
    assert files["model_tp0_pp0.pt"]["writer"] == 3  # a zero1 replica writes the model: all four ranks write
    assert {record["writer"] for record in files.values()} == {0, 1, 2, 3}
    assert checkpoint_problems(dp4) == []
    assert meta["model_config"]["hidden_size"] == 64 and meta["data"]["steps"] == 3
    # the zero1 shards tile the single process's optimizer state: same model, same fp32 masters up to summation
    # order. dp4 sums the four micro-batch gradients as (g0 + g1) + (g2 + g3), one process as ((g0 + g1) + g2) + g3;
    # Adam turns the 1-ulp difference of a near-cancelling gradient into up to a full lr step on that element, so
    # tensors are compared by relative distance (as the equivalence matrix does), which a NaN, a misplaced shard or
    # a missing replica sum moves to O(1), not by counting elements.
    distances = {
        name: relative_distance(merge_model_checkpoint(dp4, [name])[name], tensor)
        for name, tensor in merge_model_checkpoint(single).items()
    }
    assert max(distances.values()) <= 1e-3, distances

    # resuming in the same layout, each rank opens only its own files (the replicas read their block's shard)
    for rank in range(4):
        opened = _files_read_on_resume(dp4, layout, rank, monkeypatch)
        assert opened == ["model_tp0_pp0.pt", f"optim_tp0_pp0_dp{rank % 2}.pt", f"rng_rank{rank}.pt", "train_state.pt"]


def test_async_save_resumes_exactly(tmp_path, demo_data, reference_run):
    ref_dir, cut_dir = reference_run.work_dir, str(tmp_path / "cut")
    cut_cfg = write_base(str(tmp_path / "cfg_cut"), demo_data, cut_dir)
    request_stop(cut_dir, after_step=3)
    out = run_train([cut_cfg], sets=["ckpt.async_save=True", "ckpt.checkpoint_every=2"], expect=EXIT_STOPPED)
    assert "saving checkpoint" in out.stdout and "in the background" in out.stdout
    # the stop's checkpoint was completed before the process ended; the one of step 2 by the save of step 3
    assert complete_checkpoints(os.path.join(cut_dir, "checkpoints")) == [2, 3]
    assert not [n for n in os.listdir(os.path.join(cut_dir, "checkpoints")) if n.startswith(".tmp")]
    out = run_train([cut_cfg], sets=["ckpt.async_save=True", "ckpt.checkpoint_every=2"])
    assert "resumed from" in out.stdout and "checkpoints/3" in out.stdout
    ref, got = step_losses(ref_dir), step_losses(cut_dir)
    assert sorted(got) == list(range(1, 7))
    _assert_same_losses(ref, got, range(1, 7))
    final_ref = merge_model_checkpoint(os.path.join(ref_dir, "checkpoints", "6"))
    final_cut = merge_model_checkpoint(os.path.join(cut_dir, "checkpoints", "6"))
    for name, tensor in final_ref.items():
        assert torch.equal(tensor, final_cut[name]), name


def _flip_bytes(path: str, count: int = 64) -> None:
    """Overwrite ``count`` bytes in the middle of ``path`` (same size, different content)."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        data = f.read(count)
        f.seek(os.path.getsize(path) // 2)
        f.write(bytes(b ^ 0xFF for b in data))


def test_damaged_newest_checkpoint_is_reported_and_the_previous_one_resumes(tmp_path, demo_data, reference_run):
    """A corrupted file (bytes overwritten) and a missing file in the newest checkpoint: the run names the file,
    resumes from the previous complete checkpoint and reproduces the same losses."""
    base_dir = reference_run.work_dir  # checkpoints at steps 3 and 6; copied below
    ref = dict(reference_run.losses)
    for damage, report in (
        ("corrupt", "optim_tp0_pp0_dp0.pt fails its checksum"),
        ("missing", "model_tp0_pp0.pt is missing"),
    ):
        work_dir = str(tmp_path / damage)
        shutil.copytree(base_dir, work_dir)
        newest = os.path.join(work_dir, "checkpoints", "6")
        if damage == "corrupt":
            _flip_bytes(os.path.join(newest, "optim_tp0_pp0_dp0.pt"))
        else:
            os.remove(os.path.join(newest, "model_tp0_pp0.pt"))
        assert [p.split(" (")[0] for p in checkpoint_problems(newest)] == [report]

        out = run_train([write_base(str(tmp_path / f"cfg_{damage}"), demo_data, work_dir)])
        assert f"checkpoint {newest} is damaged: {report}" in out.stdout
        # the banner's start line says what the run does (it said "checkpoint .../6: ... nothing to do" before)
        previous = os.path.join(work_dir, "checkpoints", "3")
        start = next(line for line in out.stdout.splitlines() if line.startswith("  start "))
        assert start.split(None, 1)[1] == (
            f"resumes from checkpoint {previous} (step 3): phase 1 'base' step 4 (global step 4); "
            "1 newer checkpoint(s) damaged and skipped (warning below)"
        ), start
        assert "nothing to do" not in out.stdout
        assert f"resumed from {os.path.join(work_dir, 'checkpoints', '3')} (step 3" in out.stdout
        _assert_same_losses(ref, step_losses(work_dir), range(1, 7))
        assert os.path.isdir(newest + DAMAGED_SUFFIX)  # kept for inspection
        assert complete_checkpoints(os.path.join(work_dir, "checkpoints")) == [3, 6]
        assert checkpoint_problems(newest) == []  # step 6 saved again


# ---------------------------------------------------------------------- unit: CheckpointManager in one process
def _single_pc() -> SimpleNamespace:
    return SimpleNamespace(
        layout=Layout.single(),
        rank=0,
        tp_rank=0,
        pp_rank=0,
        dp_rank=0,
        dp_size=1,
        dp_group=None,
        zero1_rank=0,
        zero1_size=1,
        zero1_group=None,
        tp_size=1,
        tp_group=None,
        pp_size=1,
        pp_group=None,
    )


def _meta(step: int) -> dict:
    return dict(step=step, layout=Layout.single().to_dict())


def test_async_save_counts_only_when_complete_and_writes_the_state_of_the_save_point(tmp_path):
    root = str(tmp_path / "ckpt")
    model = tiny_model()
    opt = make_opt(model, _single_pc())
    train_zero(model, opt, range(1))
    manager = CheckpointManager(root, _single_pc(), keep_last=1)
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    path = manager.save(1, [model], opt, {"loader": {}, "history": []}, _meta(1), async_save=True)
    train_zero(model, opt, range(1, 2))  # training goes on while the files are written
    assert manager.pending == path and complete_checkpoints(root) == []  # no meta.json, no rename yet
    assert manager.finish() == path and manager.pending is None
    assert complete_checkpoints(root) == [1] and checkpoint_problems(path) == []
    weights = merge_model_checkpoint(path)
    assert all(torch.equal(weights[name], saved[name]) for name in saved)  # the CPU copy of the save point

    manager.save(2, [model], opt, {"loader": {}, "history": []}, _meta(2), async_save=True)
    assert complete_checkpoints(root) == [1]  # pruning waits for the completion of the newer one
    manager.finish()
    assert complete_checkpoints(root) == [2]
    files = read_meta(os.path.join(root, "2"))["files"]
    assert sorted(files) == ["model_tp0_pp0.pt", "optim_tp0_pp0_dp0.pt", "rng_rank0.pt", "train_state.pt"]
    assert all(record["writer"] == 0 and len(record["crc32"]) == 8 for record in files.values())


def test_failed_write_records_no_checkpoint(tmp_path):
    root = str(tmp_path / "ckpt")
    model = tiny_model()
    manager = CheckpointManager(root, _single_pc())
    unpicklable = {"loader": {"oops": lambda: None}, "history": []}
    manager.save(1, [model], make_opt(model, _single_pc()), unpicklable, _meta(1), async_save=True)
    expected = r"checkpoint .*1 was not saved: rank 0: writing checkpoint file train_state.pt into "
    with pytest.raises(RuntimeError, match=expected):
        manager.finish()
    assert complete_checkpoints(root) == [] and [n for n in os.listdir(root) if not n.startswith(".failed-")] == []


def test_no_usable_checkpoint_is_an_error_naming_the_files(tmp_path):
    root = str(tmp_path / "ckpt")
    model = tiny_model()
    opt = make_opt(model, _single_pc())
    manager = CheckpointManager(root, _single_pc())
    for step in (1, 2):
        manager.save(step, [model], opt, {"loader": {}, "history": []}, _meta(step))
    assert latest_verified_checkpoint(root) == os.path.join(root, "2")
    _flip_bytes(os.path.join(root, "2", "rng_rank0.pt"), count=8)
    os.remove(os.path.join(root, "1", "train_state.pt"))
    warnings = []
    with pytest.raises(RuntimeError, match="no usable checkpoint") as error:
        latest_verified_checkpoint(root, warnings.append)
    assert "rng_rank0.pt fails its checksum" in str(error.value) and "train_state.pt is missing" in str(error.value)
    assert warnings == []  # nothing usable: nothing is moved, the error names every damaged file
    assert sorted(os.listdir(root)) == ["1", "2"]
    os.remove(os.path.join(root, "2", "rng_rank0.pt"))
    with pytest.raises(RuntimeError, match="rng_rank0.pt is missing"):
        latest_verified_checkpoint(root)
    shutil.move(os.path.join(root, "1"), str(tmp_path / "moved_away"))
    shutil.move(os.path.join(root, "2"), str(tmp_path / "moved_away_2"))
    assert latest_verified_checkpoint(root) is None  # nothing left: a fresh start is then explicit

    # a checkpoint from before checksums (no "files" in meta.json) is taken as it is
    manager.save(3, [model], opt, {"loader": {}, "history": []}, _meta(3))
    meta_path = os.path.join(root, "3", META_FILE)
    meta = read_meta(os.path.join(root, "3"))
    del meta["files"]
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    assert latest_verified_checkpoint(root) == os.path.join(root, "3")
    shutil.rmtree(root)
