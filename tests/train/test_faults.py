"""Fault injection: a training process killed with SIGKILL at a controlled point (`internlm.faults`:
during a save, during a metrics append, one rank of two in the middle of a step), then the same command rerun:
its losses equal an uninterrupted run's, and no checkpoint or metrics line of the killed attempt survives
half-written."""

import json
import os

import pytest

from internlm.checkpoint import checkpoint_problems, complete_checkpoints
from internlm.faults import KILL_ENV
from internlm.train.lock import LOCK_FILE
from train_utils import run_train, step_losses, write_base


@pytest.fixture
def reference(reference_run):
    """Losses of an uninterrupted 6-step run (one process): the session's shared reference run."""
    return dict(reference_run.losses)


def _killed_then_rerun(tmp_path, demo_data, kill_at, nproc=1, sets=None):
    """Run with ``INTERNLM_TEST_KILL_AT=kill_at`` (the process dies by SIGKILL), then rerun the same command;
    returns (work_dir, the killed run's stdout, the rerun's stdout)."""
    work_dir = str(tmp_path / "work")
    cfg = write_base(str(tmp_path / "cfg"), demo_data, work_dir)
    os.environ[KILL_ENV] = kill_at
    try:
        killed = run_train([cfg], nproc=nproc, sets=sets, expect=-9)
    finally:
        del os.environ[KILL_ENV]
    if nproc == 1:  # the dead run could not release its lock (under torchrun rank 0 may live to release it)
        assert os.path.isfile(os.path.join(work_dir, LOCK_FILE))
    rerun = run_train([cfg], nproc=nproc, sets=sets)
    if nproc == 1:
        assert "stale lock" in rerun.stdout  # taken over with a note
    assert not os.path.exists(os.path.join(work_dir, LOCK_FILE))
    return work_dir, killed.stdout, rerun.stdout


def _assert_same_losses(expected, got):
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert abs(got[step] - loss) <= 1e-6 * abs(loss), (step, loss, got[step])


def test_kill_during_a_save(reference, tmp_path, demo_data):
    work_dir, killed, rerun = _killed_then_rerun(tmp_path, demo_data, "save:6")
    assert "saved checkpoint" in killed and "checkpoints/6" not in killed  # step 3 saved, step 6 never completed
    root = os.path.join(work_dir, "checkpoints")
    assert f"resumed from {os.path.join(root, '3')} (step 3" in rerun
    _assert_same_losses(reference, step_losses(work_dir))
    assert complete_checkpoints(root) == [3, 6] and checkpoint_problems(os.path.join(root, "6")) == []
    assert not [name for name in os.listdir(root) if name.startswith(".tmp-")]  # the partial save is cleared


def test_kill_during_a_metrics_append(reference, tmp_path, demo_data):
    work_dir, _, rerun = _killed_then_rerun(tmp_path, demo_data, "metrics:5")
    metrics = os.path.join(work_dir, "metrics.jsonl")
    assert f"warning: {metrics}: the last line is not complete JSON" in rerun
    with open(metrics) as f:
        for line in f:
            json.loads(line)  # every line whole again
    _assert_same_losses(reference, step_losses(work_dir))


@pytest.mark.slow  # three torchrun launches of two processes
def test_kill_one_rank_mid_step(tmp_path, tmp_path_factory, demo_data):
    """Two gloo processes; rank 1 dies in step 5 (after its backward pass): torchrun stops rank 0, and the rerun
    resumes from step 3 and reproduces an uninterrupted two-process run."""
    ref_dir = str(tmp_path_factory.mktemp("reference_2proc") / "work")
    run_train([write_base(str(tmp_path / "cfg_ref"), demo_data, ref_dir)], nproc=2)
    work_dir, _, rerun = _killed_then_rerun(tmp_path, demo_data, "step:5@1", nproc=2)
    assert f"resumed from {os.path.join(work_dir, 'checkpoints', '3')} (step 3" in rerun
    _assert_same_losses(step_losses(ref_dir), step_losses(work_dir))
