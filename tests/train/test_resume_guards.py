"""Smaller cases of issue 19: a stop file that names no step is warned about (internlm/train/stop.py), resuming
under another model.dtype is refused at start-up with one line (internlm/train/startup_checks.py; the weights alone
convert through ckpt.load_ckpt_folder), and two Ctrl-C while an async save is in flight exit 130, not 134
(the writer thread is stopped and joined: internlm/checkpoint/file_io.py, manager.py, train/checkpointer.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from internlm.checkpoint import complete_checkpoints
from internlm.train.run import EXIT_ABORTED
from internlm.train.stop import StopController
from train_utils import REPO, main_in_process, write_base


@pytest.fixture(scope="module")
def stop_file_run(tmp_path_factory, demo_data):
    """A 6-step run (checkpoints 3 and 6) whose stop file reads "step 3": (work_dir, config, stdout)."""
    folder = tmp_path_factory.mktemp("guards")
    work_dir = str(folder / "work")
    cfg = write_base(str(folder / "cfg"), demo_data, work_dir)
    os.makedirs(work_dir)
    with open(os.path.join(work_dir, "STOP"), "w") as f:
        f.write("step 3\n")
    status, stdout, stderr = main_in_process(["--config", cfg])
    assert status == 0, stderr
    return work_dir, cfg, stdout


def test_a_stop_file_naming_no_step_is_warned_about_once(stop_file_run):
    work_dir, _, stdout = stop_file_run
    warning = (
        f"warning: ckpt.stop_file_path {work_dir}/STOP reads 'step 3', not a step number: ignored; write the global "
        f"step to stop after (e.g. '2'), or leave the file empty to stop after the current step"
    )
    assert stdout.count("warning: ckpt.stop_file_path") == 1 and warning in stdout, stdout
    assert complete_checkpoints(os.path.join(work_dir, "checkpoints")) == [3, 6]  # not stopped


def test_an_unreadable_stop_file_is_warned_about(tmp_path):
    class _Logger:
        def __init__(self):
            self.lines = []

        def message(self, text):
            self.lines.append(text)

    logger = _Logger()
    stops, path = StopController(True, 0, logger), str(tmp_path / "STOP")
    with open(path, "wb") as f:
        f.write(b"\xff\xfe3")
    assert stops._file_target(path, 5) == float("inf") and stops._file_target(path, 6) == float("inf")
    assert len(logger.lines) == 1 and "STOP cannot be read (" in logger.lines[0] and "ignored" in logger.lines[0]
    with open(path, "w") as f:
        f.write("7")
    assert stops._file_target(path, 6) == 7 and len(logger.lines) == 1


def test_resuming_under_another_dtype_is_refused_at_start_up(stop_file_run, tmp_path, demo_data):
    work_dir, cfg, _ = stop_file_run
    checkpoint = os.path.join(work_dir, "checkpoints", "6")
    status, _, stderr = main_in_process(["--config", cfg, "--set", "model.dtype=torch.bfloat16"])
    assert status == 2 and "Traceback" not in stderr, stderr
    assert stderr.strip() == (
        f"error: {cfg}: model.dtype: torch.bfloat16 differs from torch.float32, the dtype of checkpoint {checkpoint} "
        f"this run would resume (its optimizer state is laid out for it); set model.dtype='torch.float32' to resume, "
        f"or to change the dtype start a new work_dir from its weights with ckpt.load_ckpt_folder={checkpoint} "
        f"(fresh optimizer state)"
    )
    # what the line suggests works: the weights are cast on load
    other = write_base(str(tmp_path / "cfg"), demo_data, str(tmp_path / "work"))
    sets = ["model.dtype=torch.bfloat16", f"ckpt.load_ckpt_folder={checkpoint}", "data.total_steps=1"]
    status, stdout, stderr = main_in_process(["--config", other, "--set", *sets])
    assert status == 0 and f"initial model weights from {checkpoint}" in stdout, stderr


SLOW_WRITER = """
import os, time
import internlm.checkpoint.file_io as file_io
_write = file_io._HashingWriter.write
def _slow(self, data):  # a checkpoint that takes seconds to write, as a large one does
    time.sleep(0.05)
    return _write(self, data)
file_io._HashingWriter.write = _slow
"""


def test_two_ctrl_c_during_an_async_save_exit_130(tmp_path, demo_data):
    """Before: the writer thread was still in torch.save at interpreter exit: "terminate called without an active
    exception", SIGABRT (134)."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_WRITER)
    work_dir = str(tmp_path / "work")
    cfg = write_base(str(tmp_path / "cfg"), demo_data, work_dir)
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config", cfg, "--set", "ckpt.async_save=True"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{hooks}{os.pathsep}{REPO}")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "in the background" in line:
            for _ in range(2):
                time.sleep(0.5)
                proc.send_signal(signal.SIGINT)
            break
    rest, _ = proc.communicate(timeout=120)
    output = "".join(seen) + rest
    assert proc.returncode == EXIT_ABORTED and "terminate called" not in output, output
    assert "aborted by Ctrl-C" in output and "a rerun resumes from the last complete checkpoint" in output, output
    assert complete_checkpoints(os.path.join(work_dir, "checkpoints")) == []  # the save in flight does not count
