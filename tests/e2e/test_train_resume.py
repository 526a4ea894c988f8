"""End-to-end: exact resume, checkpoints, metrics, multi-phase runs (one process)."""

import os

import torch

from internlm.checkpoint import complete_checkpoints, merge_model_checkpoint, read_meta
from internlm.checkpoint.reshard import merge_optimizer_checkpoint
from internlm.train.run import EXIT_STOPPED
from train_utils import copy_run, read_metrics, request_stop, run_train, step_losses, write_base, write_phase


def _assert_same_losses(a, b):
    assert sorted(a) == sorted(b)
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6 * abs(a[step]), (step, a[step], b[step])


def test_exact_resume_and_metrics(tmp_path, demo_data, reference_run):
    ref_dir, cut_dir = reference_run.work_dir, str(tmp_path / "cut")
    cut_cfg = write_base(str(tmp_path / "cfg_cut"), demo_data, cut_dir)
    request_stop(cut_dir, after_step=3)
    out = run_train([cut_cfg], expect=EXIT_STOPPED)
    assert "stopped after step 3" in out.stdout
    assert complete_checkpoints(os.path.join(cut_dir, "checkpoints")) == [3]
    assert sorted(step_losses(cut_dir)) == [1, 2, 3]
    out = run_train([cut_cfg])  # the same command resumes
    assert "resumed from" in out.stdout
    _assert_same_losses(step_losses(ref_dir), step_losses(cut_dir))

    records = [r for r in read_metrics(ref_dir) if "loss" in r]
    for key in ("step", "phase", "loss", "lr", "grad_norm", "tokens", "tgs", "tflops", "mfu"):
        assert key in records[0], key
    assert "optim_state_bytes" in records[0]
    assert [r["tokens"] for r in records] == [2 * 4 * 32 * (i + 1) for i in range(6)]
    assert any("val_loss" in r for r in read_metrics(ref_dir))
    # a rerun of a finished command does nothing (on a copy: the reference is shared)
    _, ref_copy_cfg = copy_run(ref_dir, str(tmp_path / "ref_copy"), demo_data)
    out = run_train([ref_copy_cfg])
    assert "nothing to do" in out.stdout
    final_ref = merge_model_checkpoint(os.path.join(ref_dir, "checkpoints", "6"))
    final_cut = merge_model_checkpoint(os.path.join(cut_dir, "checkpoints", "6"))
    for name, tensor in final_ref.items():
        assert torch.equal(tensor, final_cut[name]), name


def test_interrupted_crash_leaves_no_complete_checkpoint(tmp_path):
    from internlm.checkpoint import latest_checkpoint

    root = tmp_path / "checkpoints"
    (root / ".tmp-9").mkdir(parents=True)  # what a crash during a save leaves
    (root / "12").mkdir()  # a folder without meta.json is not complete either
    assert latest_checkpoint(str(root)) is None


PHASE2 = "data = dict(seq_len=64, micro_bsz=1, total_steps=4, train_folder={%r: 0.3, %r: 0.7})\nadam = dict(lr=1e-3)"
PHASE3 = "data = dict(total_steps=3)\nadam = dict(lr=5e-4)"


def _phases(folder, demo, work_dir, with_third=False):
    write_base(folder, demo, work_dir)
    paths = [write_phase(folder, "p1", ""), write_phase(folder, "p2", PHASE2 % (demo["docs"], demo["code"]))]
    if with_third:
        paths.append(write_phase(folder, "p3", PHASE3))
    return paths


def test_two_phases_interrupted_in_phase2_and_extended(tmp_path, demo_data):
    ref_dir, cut_dir = str(tmp_path / "ref"), str(tmp_path / "cut")
    ref = _phases(str(tmp_path / "cfg_ref"), demo_data, ref_dir, with_third=True)
    run_train(ref)  # uninterrupted: 6 + 4 + 3 steps

    cut = _phases(str(tmp_path / "cfg_cut"), demo_data, cut_dir)
    request_stop(cut_dir, after_step=8)  # inside phase 2
    run_train(cut, expect=EXIT_STOPPED)
    meta = read_meta(os.path.join(cut_dir, "checkpoints", "8"))
    assert (meta["phase_name"], meta["phase_step"]) == ("p2", 2)
    run_train(cut)  # resumes phase 2 exactly
    cut3 = _phases(str(tmp_path / "cfg_cut"), demo_data, cut_dir, with_third=True)
    out = run_train(cut3)  # adding a phase extends the run from the end of phase 2
    assert "phase 3/3 'p3': steps 1..3" in out.stdout
    _assert_same_losses(step_losses(ref_dir), step_losses(cut_dir))

    records = [r for r in read_metrics(cut_dir) if "loss" in r]
    assert [r["phase"] for r in records] == ["p1"] * 6 + ["p2"] * 4 + ["p3"] * 3
    assert {r["seq_len"] for r in records if r["phase"] == "p2"} == {64}
    assert records[9]["phase_tokens"] == 4 * 64 * 4 and records[10]["phase_tokens"] == 4 * 64
    assert records[-1]["tokens"] == 6 * 256 + 4 * 256 + 3 * 256
    meta = read_meta(os.path.join(cut_dir, "checkpoints", "13"))
    assert (meta["phase_name"], meta["phase_step"], meta["phase_completed"]) == ("p3", 3, True)


def test_edited_completed_phase_warns_and_is_not_rerun(tmp_path, demo_data):
    work_dir = str(tmp_path / "run")
    folder = str(tmp_path / "cfg")
    paths = _phases(folder, demo_data, work_dir)
    run_train(paths[:1])
    write_phase(folder, "p1", "adam = dict(lr=1e-3)")  # edit the completed phase
    out = run_train(paths)
    assert "changed after it completed" in out.stdout
    steps = step_losses(work_dir)
    assert sorted(steps) == list(range(1, 11))


def test_multiprocess_interruption_in_phase2(tmp_path, demo_data):
    """dp2 x pp2 with ZeRO-sharded optimizer states: stop inside phase 2, rerun, same losses."""
    layout = ["parallel.pipeline.size=2", "parallel.zero1=2", "data.micro_num=2"]
    ref_dir, cut_dir = str(tmp_path / "ref"), str(tmp_path / "cut")
    ref = _phases(str(tmp_path / "cfg_ref"), demo_data, ref_dir)
    run_train(ref, nproc=4, sets=layout)
    cut = _phases(str(tmp_path / "cfg_cut"), demo_data, cut_dir)
    request_stop(cut_dir, after_step=8)
    run_train(cut, nproc=4, sets=layout, expect=EXIT_STOPPED)
    assert sorted(step_losses(cut_dir)) == list(range(1, 9))
    out = run_train(cut, nproc=4, sets=layout)
    assert "resumed from" in out.stdout
    _assert_same_losses(step_losses(ref_dir), step_losses(cut_dir))
    meta = read_meta(os.path.join(cut_dir, "checkpoints", "10"))
    assert meta["layout"]["data"] == 2 and meta["layout"]["pipeline"] == 2


def test_reordered_phases_exit_2(tmp_path, demo_data):
    work_dir = str(tmp_path / "run")
    paths = _phases(str(tmp_path / "cfg"), demo_data, work_dir)
    run_train(paths[:1])
    import subprocess
    import sys

    from train_utils import REPO

    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), "--config", paths[1], paths[0]],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    assert proc.returncode == 2
    assert "keep the phases in the order they were run" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sigterm_saves_and_stops(tmp_path, demo_data):
    """A scheduler's SIGTERM: the run finishes its step, saves, exits 75 (EXIT_STOPPED); the same command resumes."""
    import signal
    import subprocess
    import sys
    import time

    from train_utils import REPO

    work_dir = str(tmp_path / "run")
    config = write_base(str(tmp_path / "cfg"), demo_data, work_dir)
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config", config, "--set", "data.total_steps=400"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(work_dir, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.isfile(metrics) and len(open(metrics).readlines()) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED, err
    assert "on a stop signal" in out
    stopped_at = max(step_losses(work_dir))
    assert stopped_at < 400
    assert complete_checkpoints(os.path.join(work_dir, "checkpoints"))[-1] == stopped_at
    run_train([config], sets=[f"data.total_steps={stopped_at + 2}"])
    assert sorted(step_losses(work_dir)) == list(range(1, stopped_at + 3))


def test_phase_reset_optimizer_and_reset_data(tmp_path, demo_data):
    """Phase 2 (same data) sets phase.reset_optimizer and phase.reset_data: it starts with fresh Adam state (its
    update count starts again) and at the beginning of the data (after its 3 steps the data position is phase 1's
    after its 3). Carried over, the count would be 6 and the position that of 6 steps."""
    work_dir, folder = str(tmp_path / "run"), str(tmp_path / "cfg")
    write_base(folder, demo_data, work_dir)
    p1 = write_phase(folder, "p1", "data = dict(total_steps=3)")
    reset = "phase = dict(name='p2', reset_optimizer=True, reset_data=True)\ndata = dict(total_steps=3)"
    p2 = write_phase(folder, "p2", reset)
    out = run_train([p1, p2])
    assert out.stdout.count("fresh optimizer state (phase.reset_optimizer)") == 1
    end1, end2 = (os.path.join(work_dir, "checkpoints", step) for step in ("3", "6"))
    assert merge_optimizer_checkpoint(end1)["num_updates"] == 3
    assert merge_optimizer_checkpoint(end2)["num_updates"] == 3  # fresh at phase 2's start
    assert read_meta(end2)["data"] == read_meta(end1)["data"]  # the same 3 steps of the same data again
    assert read_meta(end2)["step"] == 6
