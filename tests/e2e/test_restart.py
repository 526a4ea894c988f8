"""Two processes under torchrun, each with a fault: one rank killed mid-run under ``--max-restarts 1`` (the group is
restarted and resumes by itself), one rank hung (every rank writes its stacks and exits with EXIT_HUNG), one rank
slow (named at logging steps). Alerts of every run go to a webhook on 127.0.0.1 in this process."""

import os
import subprocess
import sys
import time

import pytest

from internlm.errors import EXIT_HUNG
from internlm.faults import KILL_ENV, SLEEP_ENV
from train_utils import REPO, read_metrics, step_losses, write_base


def _torchrun(config, env, sets=(), restarts=0, timeout=300):
    """torchrun of two processes on ``config``; returns (CompletedProcess, seconds)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [f"--max-restarts={restarts}", os.path.join(REPO, "train.py"), "--config", config, "--set", *sets]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, **env)
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


def _alert_sets(url):
    return [f"monitor.alert={{'enable_feishu_alert': True, 'feishu_alert_address': {url!r}}}"]


@pytest.fixture(scope="module")
def slow_rank_run(tmp_path_factory, demo_data):
    """An uninterrupted two-process run whose rank 1 sleeps 1 s in every step: the reference losses, and the
    straggler detector's subject."""
    folder = tmp_path_factory.mktemp("slow_rank")
    work_dir = str(folder / "work")
    config = write_base(str(folder / "cfg"), demo_data, work_dir)
    proc, _ = _torchrun(config, {SLEEP_ENV: "step:*@1=1.0"}, ["monitor.log_every=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work_dir, proc


@pytest.mark.slow  # a torchrun of two processes (the module's reference run)
def test_slow_rank_is_named(slow_rank_run):
    work_dir, proc = slow_rank_run
    warnings = [line for line in proc.stdout.splitlines() if "is slow" in line]
    # one line per logging step (log_every=1) naming rank 1; under load a step's own time may swallow one margin
    assert len(warnings) >= 5
    assert all(" rank 1 (" in line and "monitor.straggler_factor 1.5" in line for line in warnings)
    records = [r for r in read_metrics(work_dir) if "step_time_ranks" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for record in records:
        fast, slow = record["step_time_ranks"]
        assert slow >= 1.0 and slow > fast and record["slowest_rank"] == 1 and record["step_time_max"] == slow


@pytest.mark.slow  # a torchrun of two processes, restarted once
def test_killed_rank_restarts_and_resumes(slow_rank_run, tmp_path, demo_data, webhook):
    """Rank 1 is killed (SIGKILL) in step 5; torchrun restarts both workers once; they resume from checkpoint 3
    and finish with the reference's losses."""
    work_dir = str(tmp_path / "work")
    config = write_base(str(tmp_path / "cfg"), demo_data, work_dir)
    proc, seconds = _torchrun(config, {KILL_ENV: "step:5@1"}, _alert_sets(webhook.url), restarts=1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count(f"resumed from {os.path.join(work_dir, 'checkpoints', '3')} (step 3") == 1
    reference = step_losses(slow_rank_run[0])
    got = step_losses(work_dir)
    assert sorted(got) == sorted(reference)
    for step, loss in reference.items():
        assert abs(got[step] - loss) <= 1e-6 * abs(loss), (step, loss, got[step])
    events = webhook.events()
    assert events[0] == "start" and events[-2:] == ["restart", "stop"], events
    restart, stop = webhook.bodies[-2:]
    assert restart["attempt"] == 1 and stop["status"] == 0 and stop["reason"] == "finished"
    assert restart["msg_type"] == "text" and "restarted" in restart["content"]["text"] == restart["text"]


@pytest.mark.slow  # a torchrun of two processes
def test_hung_rank_is_named(tmp_path, demo_data, webhook):
    """Rank 1 sleeps 120 s in step 2; with monitor.hang_timeout_s=6 both ranks write their stacks and exit 124."""
    work_dir = str(tmp_path / "work")
    config = write_base(str(tmp_path / "cfg"), demo_data, work_dir)
    sets = ["monitor.hang_timeout_s=6", *_alert_sets(webhook.url)]
    proc, seconds = _torchrun(config, {SLEEP_ENV: "step:2@1=120"}, sets)
    assert proc.returncode == 1 and f"exitcode  : {EXIT_HUNG} " in proc.stderr, proc.stderr[-5000:]
    assert seconds < 60  # not the 120 s sleep, nor the 30-minute collective timeout
    stacks = [open(os.path.join(work_dir, f"hang_rank{r}.txt")).read() for r in (0, 1)]
    assert all("step 2 made no progress for 6 s (monitor.hang_timeout_s)" in text for text in stacks)
    assert "in sleep_point" in stacks[1] and "in train_step" in stacks[1]  # the hung rank's frame
    assert "in sleep_point" not in stacks[0] and "in train_step" in stacks[0]  # rank 0 waits in the step
    assert "error: rank 1 (" in proc.stderr and "hang_rank1.txt" in proc.stderr
    hang = [b for b in webhook.bodies if b["event"] == "hang"]
    assert len(hang) == 1 and hang[0]["step"] == 2 and hang[0]["rank"] == 0
