"""Stop files (empty, a step already passed, not a number), the TensorBoard purge on resume and the keep_last disk
warning: in-process, no training run."""

import os
import shutil
from types import SimpleNamespace

import pytest
import torch

from internlm.config import load_run_config
from internlm.planning import checkpoint_bytes
from internlm.train import startup_checks
from internlm.train.metrics import MetricsLogger
from internlm.train.stop import StopController
from train_utils import write_base


def _stop_after(tmp_path, text, step, messages=None):
    """Whether a run at ``step`` stops, with ``text`` in its stop file (None: no file); and the step it stops at
    later when the file names a future one. ``messages`` collects the console lines."""
    path = tmp_path / "STOP"
    if text is not None:
        path.write_text(text)
    phase = SimpleNamespace(config=SimpleNamespace(ckpt=SimpleNamespace(stop_file_path=str(path))))
    messages = [] if messages is None else messages
    stops = StopController(saves=True, rank=0, logger=SimpleNamespace(message=messages.append))
    now, minus_target = stops.flags(phase, step, torch.device("cpu"), world_size=1).tolist()
    return stops.decide(now, minus_target, step), stops.stop_at


@pytest.mark.parametrize(
    "text, step, expected",
    [
        ("", 5, (True, None)),  # an empty file: stop after this step
        ("\n", 5, (True, None)),
        ("2", 5, (True, None)),  # a step already passed: stop now, not never
        ("5", 5, (True, None)),
        ("8", 5, (False, 8)),  # a later step: remembered, honoured there
        ("soon", 5, (False, None)),  # not a step number: ignored
        (None, 5, (False, None)),
    ],
)
def test_stop_file(tmp_path, text, step, expected):
    messages = []
    assert _stop_after(tmp_path, text, step, messages) == expected
    if text == "soon":  # a stop file that names no step is warned about, not ignored silently
        assert len(messages) == 1 and "reads 'soon', not a step number: ignored" in messages[0], messages
    else:
        assert messages == []


def test_later_stop_step_is_due_at_that_step(tmp_path):
    (tmp_path / "STOP").write_text("8")
    phase = SimpleNamespace(config=SimpleNamespace(ckpt=SimpleNamespace(stop_file_path=str(tmp_path / "STOP"))))
    stops = StopController(saves=True, rank=0, logger=SimpleNamespace(message=print))
    now, minus_target = stops.flags(phase, 4, torch.device("cpu"), world_size=1).tolist()
    assert not stops.decide(now, minus_target, 4)
    assert [stops.due(step) for step in (5, 7, 8, 9)] == [False, False, True, True]


def _scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(folder, purge_orphaned_data=True)
    events.Reload()
    return [(e.step, round(e.value, 6)) for e in events.Scalars(tag)]


def test_tensorboard_purges_steps_after_the_resumed_checkpoint(tmp_path):
    """A run logged steps 1-5 and died; the rerun resumes from step 3 (`truncate_after(3)`) and logs 4-5 again:
    TensorBoard shows each step once, 4 and 5 with the rerun's values (purge_step), as metrics.jsonl does."""
    pytest.importorskip("tensorboard")  # the test extra installs it (CI fails on a skip)
    work_dir = str(tmp_path / "run")
    first = MetricsLogger(work_dir, enabled=True, tensorboard=True, console=False)
    for step in range(1, 6):
        first.log(dict(step=step, loss=10.0 + step))
    first.close()
    again = MetricsLogger(work_dir, enabled=True, tensorboard=True, console=False)
    again.truncate_after(3)
    for step in (4, 5):
        again.log(dict(step=step, loss=20.0 + step))
    again.close()
    assert _scalars(os.path.join(work_dir, "tensorboard"), "train/loss") == [
        (1, 11),
        (2, 12),
        (3, 13),
        (4, 24),
        (5, 25),
    ]
    with open(os.path.join(work_dir, "metrics.jsonl")) as f:
        assert [line.count('"step"') for line in f] == [1] * 5


@pytest.mark.parametrize("free_checkpoints, warned", [(3, True), (7, False)])
def test_keep_last_disk_warning(tmp_path, demo_data, monkeypatch, free_checkpoints, warned):
    """ckpt.keep_last = 5 keeps 5 checkpoints (+1 while saving): room for 3 warns, naming the folder, the room and
    keep_last; room for 7 does not."""
    config = load_run_config(write_base(str(tmp_path / "cfg"), demo_data, str(tmp_path / "run")))
    assert config.ckpt.keep_last == 5
    need = checkpoint_bytes(config.model_config)["total"]
    usage = shutil.disk_usage(str(tmp_path))
    fake = type(usage)(usage.total, usage.used, int(need * free_checkpoints + 1))
    monkeypatch.setattr(startup_checks.shutil, "disk_usage", lambda path: fake)
    warnings = []
    startup_checks.check_checkpoints(config, warnings.append, loads_initial=False)
    if warned:
        (line,) = warnings
        root = config.ckpt.save_ckpt_folder
        assert line.startswith(f"{root} has room for 3 checkpoint(s) of about ") and "ckpt.keep_last=5 keeps 5" in line
    else:
        assert warnings == []
