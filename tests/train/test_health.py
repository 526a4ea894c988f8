"""Training health: non-finite steps skipped (optimizer state bit-unchanged), counted, stopping the run after
health.max_skipped_steps in a row with no checkpoint saved meanwhile; loss spikes; rollback with skipped batches;
data.skip_batches; strict-JSON metrics; the unhealthy exit code.

NaN and spikes are injected by monkeypatching the trainer's loss function in an in-process run (nothing a user
could trip): the loss of the chosen global steps is multiplied by nan (its gradients become nan too) or by a
factor (a spike).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import contextmanager

import pytest
import torch
from test_sync_free import make_trainer, restored_signal_handlers

import internlm.train.model_state as model_state_module
from internlm.checkpoint import complete_checkpoints, read_meta
from internlm.checkpoint.manager import CheckpointManager
from internlm.config import ConfigError
from internlm.train.health import HealthMonitor, UnhealthyStop, mark_unhealthy
from internlm.train.metrics import MetricsLogger
from internlm.train.run import EXIT_UNHEALTHY
from internlm.train.step_runner import StepRunner
from train_utils import REPO, read_metrics, run_train, step_losses, write_base
from zero_utils import backward_step, make_opt, tiny_model, train_zero

BASE = ["data.valid_ratio=0", "monitor.log_every=1", "ckpt.keep_last=1"]


def _strict_lines(path: str) -> list:
    """metrics.jsonl parsed as strict JSON: a bare NaN / Infinity fails."""

    def reject(token):
        raise ValueError(f"{path}: non-standard JSON constant {token}")

    with open(path) as f:
        return [json.loads(line, parse_constant=reject) for line in f]


@contextmanager
def injected(steps, factor=float("nan")):
    """The loss of global ``steps`` multiplied by ``factor`` (nan: a non-finite loss and gradients). Also records
    the optimizer's masters and moments after every step (``states[step]``)."""
    current, states = {}, {}
    original_step, original_build = StepRunner.train_step, model_state_module.build_loss_fn

    def train_step(self, model, *args, step, **kwargs):
        current["step"] = step
        out = original_step(self, model, *args, step=step, **kwargs)
        opt = model.optimizer
        moments = [opt.optimizer.state.get(m, {}) for m in opt.masters]
        states[current["step"]] = [t.clone() for t in opt.masters] + [
            s[k].clone() for s in moments for k in ("exp_avg", "exp_avg_sq", "step") if k in s
        ]
        return out

    def build_loss_fn(config, pc):
        loss_fn = original_build(config, pc)
        return lambda output, labels: loss_fn(output, labels) * (factor if current.get("step") in steps else 1.0)

    StepRunner.train_step, model_state_module.build_loss_fn = train_step, build_loss_fn
    try:
        yield states
    finally:
        StepRunner.train_step, model_state_module.build_loss_fn = original_step, original_build


def _run(tmp_path, demo_data, sets, steps=(), factor=float("nan")):
    """An in-process run; returns (trainer, the exception it raised or None, per-step optimizer states)."""
    with restored_signal_handlers(), injected(set(steps), factor) as states:
        trainer = make_trainer(tmp_path, demo_data, BASE + sets)
        try:
            trainer.run()
        except UnhealthyStop as exc:
            return trainer, exc, states
    return trainer, None, states


def _log(trainer) -> str:
    with open(os.path.join(trainer.work_dir, "train.log")) as f:
        return f.read()


# ---------------------------------------------------------------------- the optimizer's skip path
@pytest.mark.parametrize("how", ["nan gradients", "skip flag"])
def test_skipped_step_leaves_optimizer_state_bit_unchanged(how):
    """After real updates (moments, step counts present): a skipped step changes no master, moment, step count
    or model weight; only skipped_steps counts it."""
    model = tiny_model()
    opt = make_opt(model)
    train_zero(model, opt, range(2))

    def state():
        out = [m.clone() for m in opt.masters] + [p.detach().clone() for p in model.parameters()]
        for master in opt.masters:
            s = opt.optimizer.state[master]
            out += [s["exp_avg"].clone(), s["exp_avg_sq"].clone(), s["step"].clone()]
        return out

    before, updates = state(), opt.num_updates
    opt.begin_step(2)
    backward_step(model, 5, 0, 1, micro_num=2, loss_scale=float("nan") if how == "nan gradients" else 1.0)
    norm, skipped = opt.step(skip=torch.tensor(how == "skip flag"))
    opt.sync_params()
    assert bool(skipped) and opt.skipped_steps == 1 and opt.num_updates == updates == 2
    assert math.isnan(float(norm)) == (how == "nan gradients")
    after = state()
    assert all(torch.equal(a, b) for a, b in zip(before, after))


# ---------------------------------------------------------------------- non-finite steps
def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path, demo_data):
    """NaN at steps 6-8 (max_skipped_steps=3): each skipped with a warning, optimizer state that of step 5, no
    checkpoint saved at 6 or 8, the run stops after step 8; checkpoint 4 (the newest healthy) survives keep_last=1."""
    sets = ["data.total_steps=10", "ckpt.checkpoint_every=2", "health.max_skipped_steps=3"]
    trainer, stop, states = _run(tmp_path, demo_data, sets, steps=(6, 7, 8))
    assert stop is not None and "stopped unhealthy after step 8: steps 6-8 (3 in a row" in str(stop)
    assert "data.skip_batches='5-8'" in str(stop) and "a rerun resumes from" in str(stop)
    for step in (6, 7, 8):
        assert all(torch.equal(a, b) for a, b in zip(states[step], states[5])), step
    root = os.path.join(trainer.work_dir, "checkpoints")
    assert complete_checkpoints(root) == [4]
    meta = read_meta(os.path.join(root, "4"))
    assert meta["health"]["healthy"] is True and meta["skip_batches"] == ""
    records = [r for r in _strict_lines(os.path.join(trainer.work_dir, "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 9))
    bad = [r for r in records if r["step"] >= 6]
    assert all(r["loss"] is None and r["grad_norm"] is None and r["skipped"] is True for r in bad)
    assert [r["nonfinite_steps"] for r in records] == [0] * 5 + [1, 2, 3]
    assert [r["skipped_steps"] for r in records][-1] == 3
    log = _log(trainer)
    assert "warning: step 6 skipped: loss nan, gradient norm nan (1 in a row" in log
    assert "no checkpoint saved at step 6: the run is unhealthy" in log and "saved checkpoint" in log
    assert "done:" not in log and "stopped unhealthy after step 8" in log


def test_unhealthy_flush_decides_with_log_every(tmp_path, demo_data):
    """log_every=4: health is decided at the logging step; the unhealthy end of the run (the last 2 of 8 steps
    skipped, below the limit) is not 'done' and saves nothing."""
    sets = ["data.total_steps=8", "ckpt.checkpoint_every=4", "monitor.log_every=4", "health.max_skipped_steps=5"]
    trainer, stop, _ = _run(tmp_path, demo_data, sets, steps=(7, 8))
    assert stop is not None and "steps 7-8 (2 in a row" in str(stop)
    assert complete_checkpoints(os.path.join(trainer.work_dir, "checkpoints")) == [4]


def test_divergence_exits_unhealthy_and_marks_the_checkpoint(tmp_path, demo_data):
    """adam.lr=1000 through train.py: non-finite gradient norms from step 2, exit 3 (not 'done'); checkpoint 1
    holds the diverged weights and is marked unhealthy; a rerun refuses it with one line, exit 3; the same under
    two pipeline stages."""
    import subprocess
    import sys

    work_dir = str(tmp_path / "run")
    cfg = write_base(str(tmp_path / "cfg"), demo_data, work_dir)
    sets = ["adam.lr=1000", "model.hidden_size=128", "data.total_steps=8", "ckpt.checkpoint_every=1", *BASE]
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config", cfg, "--set", *sets]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_UNHEALTHY, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stopped unhealthy after step 4: steps 2-4" in proc.stdout and "done:" not in proc.stdout
    assert "Traceback" not in proc.stderr
    root = os.path.join(work_dir, "checkpoints")
    assert complete_checkpoints(root) == [1]
    assert read_meta(os.path.join(root, "1"))["health"]["healthy"] is False
    assert all(r.get("grad_norm", 0) is None for r in _strict_lines(os.path.join(work_dir, "metrics.jsonl"))[1:])
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == EXIT_UNHEALTHY and "Traceback" not in again.stderr
    assert f"checkpoint {root}/1 is marked unhealthy" in again.stdout
    # two pipeline stages: the loss (summed over the stages before the update) and the norm are the same on both
    # ranks, so both skip the same steps and stop where one process does (torchrun names the exit status)
    pp_dir = str(tmp_path / "pp2")
    pp_cfg = write_base(str(tmp_path / "cfg_pp2"), demo_data, pp_dir)
    proc = run_train([pp_cfg], nproc=2, sets=sets + ["parallel.pipeline.size=2"], expect=EXIT_UNHEALTHY)
    assert "stopped unhealthy after step 4: steps 2-4" in proc.stdout
    single, pp = step_losses(work_dir), step_losses(pp_dir)
    assert sorted(pp) == sorted(single) == [1, 2, 3, 4]
    assert all(pp[step] == pytest.approx(single[step], rel=1e-4) for step in single)


def test_pruning_keeps_the_newest_healthy_checkpoint(tmp_path):
    root = str(tmp_path / "ckpt")
    for step in (2, 4, 6):
        os.makedirs(os.path.join(root, str(step)))
        with open(os.path.join(root, str(step), "meta.json"), "w") as f:
            json.dump(dict(step=step, health=dict(healthy=True)), f)
    for step in (4, 6):
        mark_unhealthy(os.path.join(root, str(step)), "test")
    manager = CheckpointManager(root, None, keep_last=1)
    manager._prune()
    assert complete_checkpoints(root) == [2, 6]
    assert read_meta(os.path.join(root, "6"))["health"] == dict(healthy=False, reason="test")


# ---------------------------------------------------------------------- spikes, rollback, skip_batches
SPIKE = ["data.total_steps=9", "ckpt.checkpoint_every=2", "health.spike_window=3", "health.spike_factor=3.0"]


def test_loss_spike_is_logged_and_counted(tmp_path, demo_data):
    trainer, stop, _ = _run(tmp_path, demo_data, SPIKE, steps=(6,), factor=20.0)
    assert stop is None
    records = [r for r in read_metrics(trainer.work_dir) if "loss" in r]
    assert [r["loss_spikes"] for r in records] == [0] * 5 + [1] * 4
    log = _log(trainer)
    assert "warning: step 6: loss spike" in log and "spikes 1" in log and "done: step 9" in log
    monitor = HealthMonitor(max_skipped_steps=3, spike_factor=2.0, spike_window=2)
    verdicts = [monitor.observe(i, loss, 1.0, False) for i, loss in enumerate([4.0, 4.0, 9.0, 7.9, 4.0])]
    assert [v.spike for v in verdicts] == [False, False, True, False, False]  # 7.9 < 2 * 4: not a spike


def test_rollback_skips_the_batch_like_skip_batches(tmp_path, demo_data):
    """A spike at step 6 with health.rollback: back to checkpoint 4, step 6's batch skipped; the losses are those
    of a run given data.skip_batches='6', and the checkpoints record it, so a resume from 4 skips it too."""
    sets = SPIKE + ["health.rollback=True", "ckpt.keep_last=0"]
    rolled, stop, _ = _run(tmp_path / "a", demo_data, sets, steps=(6,), factor=20.0)
    assert stop is None
    reference, _, _ = _run(tmp_path / "b", demo_data, SPIKE + ["data.skip_batches='6'"])
    expected = step_losses(reference.work_dir)
    assert sorted(expected) == [1, 2, 3, 4, 5, 7, 8, 9]
    assert step_losses(rolled.work_dir) == expected
    log = _log(rolled)
    assert "loss spike at step 6: rolling back to" in log and "step 6: batch skipped" in log
    root = os.path.join(rolled.work_dir, "checkpoints")
    assert read_meta(os.path.join(root, "9"))["skip_batches"] == "6"
    assert read_meta(os.path.join(root, "9"))["health"]["rollbacks"] == 1
    # resume from checkpoint 4 (it records the skipped step), with nothing injected
    for step in complete_checkpoints(root):
        if step != 4:
            shutil.rmtree(os.path.join(root, str(step)))
    assert read_meta(os.path.join(root, "4"))["skip_batches"] == "6"
    resumed, stop, _ = _run(tmp_path / "a", demo_data, SPIKE)
    assert stop is None and step_losses(resumed.work_dir) == expected


def test_skip_batches_is_checked_at_load(tmp_path, demo_data):
    with pytest.raises(ConfigError, match=r"data.skip_batches.*first step is after its last"):
        make_trainer(tmp_path, demo_data, ["data.skip_batches='9-3'"])


def test_metrics_are_strict_json(tmp_path):
    logger = MetricsLogger(str(tmp_path), enabled=True, tensorboard=False)
    logger.log(dict(step=1, loss=float("nan"), grad_norm=float("inf"), nested=dict(x=[float("-inf"), 1.5])))
    logger.close()
    assert _strict_lines(str(tmp_path / "metrics.jsonl")) == [
        dict(step=1, loss=None, grad_norm=None, nested=dict(x=[None, 1.5]))
    ]
