"""A full disk during a checkpoint save (internlm/checkpoint/manager.py, internlm/train/checkpointer.py): one line
naming the step folder and the space a checkpoint takes, exit status 74, the partial ``.tmp-N`` folder removed and
the earlier checkpoints intact; a rerun names a leftover ``.tmp-N`` (with its size), removes it and resumes.

The disk is simulated in this process: every file opened for writing under the checkpoint folder fails with
ENOSPC once the folder would exceed a quota (a tmpfs needs root, which CI is not). Training runs in this process
through `cli.main`, as tests/train/test_bad_inputs.py does.
"""

from __future__ import annotations

import builtins
import errno
import os

import pytest

from internlm.checkpoint import checkpoint_problems, complete_checkpoints
from internlm.train.run import EXIT_SAVE_FAILED
from train_utils import main_in_process, step_losses, write_base


def _used(root: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)


class _Limited:
    """A file under the quota'd folder: each write is flushed, and fails with ENOSPC past the quota."""

    def __init__(self, file, root: str, limit: int) -> None:
        self._file, self._root, self._limit = file, root, limit

    def write(self, data) -> int:
        size = len(data.encode()) if isinstance(data, str) else memoryview(data).nbytes
        if _used(self._root) + size > self._limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = self._file.write(data)
        self._file.flush()
        return written

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def __getattr__(self, name):
        return getattr(self._file, name)


def _full_disk(monkeypatch, root: str, limit: int) -> None:
    real_open = builtins.open

    def quota_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if any(c in mode for c in "wax") and os.path.abspath(str(file)).startswith(root):
            return _Limited(handle, root, limit)
        return handle

    monkeypatch.setattr(builtins, "open", quota_open)


# the checkpoint of this tiny model is about 7.4 MB: 11 MB hold step 3's and fail step 6's in its middle
@pytest.mark.parametrize(
    "case, limit, async_save",
    [("second save", 11_000_000, False), ("async", 11_000_000, True), ("first save", 0, False)],
)
def test_full_disk_fails_the_save_in_one_line(tmp_path, demo_data, monkeypatch, case, limit, async_save):
    work_dir = str(tmp_path / "work")
    root = os.path.join(work_dir, "checkpoints")
    cfg = write_base(str(tmp_path / "cfg"), demo_data, work_dir)
    sets = [f"ckpt.async_save={async_save}", "ckpt.keep_last=1"]
    with monkeypatch.context() as patch:
        _full_disk(patch, os.path.abspath(root), limit)
        status, _, stderr = main_in_process(["--config", cfg, "--set", *sets])
    step = 6 if limit else 3
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert status == EXIT_SAVE_FAILED and len(lines) == 1 and "Traceback" not in stderr, stderr
    line = lines[0]
    assert line.startswith(f"error: checkpoint {root}/{step} was not saved: rank 0: "), line
    assert "No space left on device (errno 28)" in line and f"partial folder {root}/.tmp-{step} was removed" in line
    if limit:  # the space a checkpoint takes, as the previous one's meta.json accounts it
        assert f"takes 7.1 MiB (as {root}/3 holds)" in line and f"resume from {root}/3" in line, line
        assert complete_checkpoints(root) == [3] and checkpoint_problems(os.path.join(root, "3")) == []
    else:  # no checkpoint yet: the estimate start-up uses
        assert "takes about 7.0 MiB (weights + fp32 optimizer state)" in line and "starts afresh" in line, line
        assert complete_checkpoints(root) == []
    assert not [name for name in os.listdir(root) if name.startswith((".tmp-", ".records"))], os.listdir(root)
    if case != "second save":
        return
    # the rerun: a leftover partial save (as a kill during a save leaves one) is named, removed, and the run
    # resumes from step 3 and reproduces the steps it had trained
    losses = step_losses(work_dir)
    leftover = os.path.join(root, ".tmp-6")
    os.makedirs(leftover)
    with open(os.path.join(leftover, "model_tp0_pp0.pt"), "wb") as f:
        f.write(b"\0" * 3_000_000)
    status, stdout, stderr = main_in_process(["--config", cfg, "--set", *sets])
    assert status == 0, stderr
    assert f"warning: {leftover} is a checkpoint save that did not complete (2.9 MiB); removed" in stdout, stdout
    assert complete_checkpoints(root) == [6] and step_losses(work_dir) == losses
