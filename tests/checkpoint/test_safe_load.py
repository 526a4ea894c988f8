"""Loading a checkpoint runs no code from it (internlm/checkpoint/safe_load.py).

One tiny checkpoint is trained once (a run stopped after step 1 of 2, so it resumes); each case copies it and
poisons one file with a pickle payload that creates a marker file when unpickled, recomputing the file's bytes and
CRC-32 in meta.json as anyone can. `InternLM.from_pretrained`, training from ``ckpt.load_ckpt_folder``, a plain
resume (payload in train_state.pt) and tools/convert_to_hf.py must refuse it, exit status 2 with one line naming
the file, and the marker must not exist. A control shows the payload is live (``weights_only=False`` runs it).
Old checkpoints keep loading: an RNG file written the way earlier versions wrote it (numpy's state tuple) is read.
"""

from __future__ import annotations

import os
import random
import shutil
import sys

import numpy as np
import pytest
import torch

from internlm.checkpoint import file_record, read_meta, rewrite_meta, rng_file
from internlm.checkpoint.manager import CheckpointManager
from internlm.checkpoint.safe_load import UnsafeCheckpointFile, load_checkpoint_file
from internlm.model import InternLM
from train_utils import REPO, main_in_process, request_stop, run_train, write_base

sys.path.insert(0, os.path.join(REPO, "tools"))
import convert_to_hf  # noqa: E402


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: code from the file runs and leaves the marker behind."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_data):
    """work_dir of a run of 2 steps stopped after step 1 (checkpoint 1, resumable)."""
    folder = tmp_path_factory.mktemp("safe")
    work_dir = str(folder / "work")
    cfg = write_base(str(folder / "cfg"), demo_data, work_dir)
    request_stop(work_dir, 1)
    run_train([cfg], sets=["data.total_steps=2", "ckpt.checkpoint_every=1"], expect=75)
    return work_dir


def _poison(step_folder: str, name: str, marker: str) -> str:
    """Add the payload to file ``name`` of the checkpoint and record its new size and CRC-32 in meta.json."""
    path = os.path.join(step_folder, name)
    obj = torch.load(path, weights_only=True)
    obj["extra"] = _Payload(marker)
    torch.save(obj, path)
    meta = read_meta(step_folder)
    meta["files"][name].update(file_record(path))
    rewrite_meta(step_folder, meta)
    return path


def _copy(trained, tmp_path, demo_data, name):
    """A copy of the trained work_dir with file ``name`` of checkpoint 1 poisoned; (work_dir, config, marker)."""
    work_dir = str(tmp_path / "work")
    shutil.copytree(trained, work_dir)
    marker = str(tmp_path / "MARKER")
    _poison(os.path.join(work_dir, "checkpoints", "1"), name, marker)
    return work_dir, write_base(str(tmp_path / "cfg"), demo_data, work_dir), marker


def _status_and_stderr(args):
    status, _, err = main_in_process(args)
    return status, err


def _assert_refused(stderr: str, path: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint file ") and "Traceback" not in stderr, stderr
    assert path in lines[0] and "was refused" in lines[0] and "could run code" in lines[0], lines[0]


def test_the_payload_is_live(trained, tmp_path, demo_data):
    """Control: the poisoned file runs its payload under ``weights_only=False`` (what main did)."""
    work_dir, _, marker = _copy(trained, tmp_path, demo_data, "model_tp0_pp0.pt")
    torch.load(os.path.join(work_dir, "checkpoints", "1", "model_tp0_pp0.pt"), weights_only=False)
    assert os.path.exists(marker)


def test_from_pretrained_refuses(trained, tmp_path, demo_data):
    work_dir, _, marker = _copy(trained, tmp_path, demo_data, "model_tp0_pp0.pt")
    with pytest.raises(UnsafeCheckpointFile, match="model_tp0_pp0.pt was refused: its pickle calls .*open"):
        InternLM.from_pretrained(work_dir)
    assert not os.path.exists(marker)


def test_convert_to_hf_refuses(trained, tmp_path, demo_data, capsys):
    work_dir, _, marker = _copy(trained, tmp_path, demo_data, "model_tp0_pp0.pt")
    with pytest.raises(SystemExit) as exit_info:
        convert_to_hf.main(["--checkpoint", work_dir, "--output", str(tmp_path / "hf")])
    assert exit_info.value.code == 2
    _assert_refused(capsys.readouterr().err, os.path.join(work_dir, "checkpoints", "1", "model_tp0_pp0.pt"))
    assert not os.path.exists(marker)


@pytest.mark.parametrize("scan", ["start-up scan", "load"])
@pytest.mark.parametrize("case", ["load_ckpt_folder", "resume"])
def test_training_refuses(trained, tmp_path, demo_data, monkeypatch, case, scan):
    """Training from ckpt.load_ckpt_folder (payload in the model file) or resuming (payload in train_state.pt)
    exits 2 with one line, by the start-up scan or, with the scan turned off, by the load itself."""
    name = "model_tp0_pp0.pt" if case == "load_ckpt_folder" else "train_state.pt"
    work_dir, cfg, marker = _copy(trained, tmp_path, demo_data, name)
    step_folder = os.path.join(work_dir, "checkpoints", "1")
    sets = ["data.total_steps=2", "ckpt.checkpoint_every=1"]
    if case == "load_ckpt_folder":  # a fresh run starting from the poisoned checkpoint's weights
        fresh = str(tmp_path / "fresh")
        cfg = write_base(str(tmp_path / "cfg2"), demo_data, fresh)
        sets.append(f"ckpt.load_ckpt_folder={step_folder}")
    if scan == "load":
        monkeypatch.setattr("internlm.train.startup_checks.check_checkpoint_files", lambda *args: None)
    status, stderr = _status_and_stderr(["--config", cfg, "--set", *sets])
    assert status == 2
    _assert_refused(stderr, os.path.join(step_folder, name))
    assert not os.path.exists(marker)


def test_old_rng_files_still_load(tmp_path):
    """RNG files as earlier versions wrote them (numpy's state a tuple holding a uint32 array) are restored; a new
    file holds plain values and loads without the numpy allowance."""
    np.random.seed(3)
    old = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    expected = np.random.rand(4)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save(old, folder / rng_file(0))
    torch.save({"loader": {}, "history": []}, folder / "train_state.pt")
    np.random.seed(99)

    class _PC:
        rank = 0

    assert CheckpointManager(str(folder), _PC()).load_train_state(str(folder)) == {"loader": {}, "history": []}
    assert np.array_equal(np.random.rand(4), expected)
    with pytest.raises(UnsafeCheckpointFile, match="numpy"):  # only RNG files get the numpy allowance
        load_checkpoint_file(str(folder / rng_file(0)))

    from internlm.checkpoint.manager import _rng_state  # what a save writes now

    torch.save(_rng_state(), folder / "new.pt")
    assert isinstance(load_checkpoint_file(str(folder / "new.pt"))["numpy"], dict)
