"""Weights & Biases beside TensorBoard (``monitor.wandb``): offline, no network, under a temporary WANDB_DIR."""

import glob
import os
import subprocess
import sys

import pytest

from internlm.config import ConfigError, load_run_config
from train_utils import REPO

pytest.importorskip("wandb")  # in the test extra (CI fails on a skip)


def test_offline_run_records_every_metric(tmp_path):
    # in a process of its own, as in training: wandb's service completes the run file when the process exits
    work_dir = str(tmp_path / "run")
    script = f"""
from internlm.train.metrics import MetricsLogger
logger = MetricsLogger({work_dir!r}, True, tensorboard=False, console=False, wandb=dict(project="t", mode="offline"))
logger.log(dict(step=1, loss=2.5, skipped=False, phase="p"))
logger.log({{"step": 2, "loss": 2.25, "eval/next_line/acc": 0.625, "val_loss": 3.5}})
logger.close()
"""
    env = dict(os.environ, PYTHONPATH=REPO, WANDB_DIR=str(tmp_path / "wandb_home"), WANDB_SILENT="true")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    runs = glob.glob(os.path.join(work_dir, "wandb", "wandb", "offline-run-*", "run-*.wandb"))
    assert len(runs) == 1
    with open(runs[0], "rb") as f:
        data = f.read()
    for tag in (b"train/loss", b"eval/next_line/acc", b"valid/loss", b"0.625", b"2.25"):
        assert tag in data, tag
    assert b"train/skipped" not in data and b"train/phase" not in data  # numbers only, no flags or names


def test_wandb_settings_are_checked():
    with pytest.raises(ConfigError, match="mode"):
        load_run_config("configs/demo.py", overrides=['monitor.wandb={"project": "p", "mode": "cloud"}'])
    with pytest.raises(ConfigError, match="project"):
        load_run_config("configs/demo.py", overrides=['monitor.wandb={"mode": "offline"}'])
