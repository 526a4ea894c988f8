"""The step loop issues no host sync between logging steps (one process, tiny model, CPU).

A host sync is a call that needs a tensor's value on the host: ``Tensor.item``, ``tolist``, ``__int__``,
``__float__``, ``__bool__``, ``__index__``. They are counted by patching those methods while a Trainer runs; each
call is attributed to the step in flight and to the optimizer when a frame of ``internlm/optim`` is on the stack
(the optimizer's own sync-free ``step()`` is a separate piece of work: `test_optimizer_step_sync_free` checks it
once ``step()`` returns tensors, and says that it is skipped until then).
"""

from __future__ import annotations

import os
import signal
import sys
from collections import defaultdict
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from internlm.data import build_train_loader
from internlm.labels import IGNORE_INDEX
from internlm.model import InternLM, InternLMConfig, PackedDocs, attention
from internlm.parallel import ParallelContext
from internlm.train.cli import load_phases
from internlm.train.distributed import Launch
from internlm.train.step_runner import StepRunner
from internlm.train.stop import StopRequested
from internlm.train.trainer import Trainer
from train_utils import REPO, read_metrics, request_stop, step_losses, write_base, write_phase

SYNC_METHODS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")
LOG_EVERY = 4
STEPS = 8
_OPTIM = os.sep + os.path.join("internlm", "optim") + os.sep
_REPO = REPO  # the repository root (tests/train_utils.py)


def _site() -> tuple:
    """(whether an internlm/optim frame is on the stack, the innermost repository frame as 'file:line')."""
    frame = sys._getframe(2)
    in_optim, site = False, None
    while frame is not None:
        filename = frame.f_code.co_filename
        in_optim = in_optim or _OPTIM in filename
        if site is None and filename.startswith(_REPO) and not filename.endswith("test_sync_free.py"):
            site = f"{os.path.relpath(filename, _REPO)}:{frame.f_lineno}"
        frame = frame.f_back
    return in_optim, site


@contextmanager
def count_host_syncs(events: list, current: dict):
    """Append ``(step, method, in_optim, site)`` for every host-sync call while active."""
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def counted(name, method):
        def wrapper(self, *args, **kwargs):
            in_optim, site = _site()
            events.append((current["step"], name, in_optim, site))
            return method(self, *args, **kwargs)

        return wrapper

    for name, method in originals.items():
        setattr(torch.Tensor, name, counted(name, method))
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


@contextmanager
def restored_signal_handlers():
    """The Trainer installs SIGTERM / SIGINT handlers: give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def make_trainer(tmp_path, demo_data, sets):
    work_dir = str(tmp_path / "run")
    folder = str(tmp_path / "cfg")
    write_base(folder, demo_data, work_dir)
    config = write_phase(folder, "p1", "")
    _, phases = load_phases(["--config", config, "--set", *sets])
    return Trainer.build(
        phases, Launch(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")), ParallelContext()
    )


@pytest.fixture(scope="module")
def sync_run(tmp_path_factory, demo_data):
    """Eight training steps with log_every=4 (no validation, no checkpoints) under the sync counter."""
    tmp_path = tmp_path_factory.mktemp("sync_free")
    sets = [
        f"monitor.log_every={LOG_EVERY}",
        f"data.total_steps={STEPS}",
        "data.valid_ratio=0",
        "ckpt.enable_save_ckpt=False",
    ]
    events, current, returned = [], {"step": 0}, []
    original_step = StepRunner.train_step

    def train_step(self, *args, step, **kwargs):
        current["step"] = step
        out = original_step(self, *args, step=step, **kwargs)
        returned.append(out)
        return out

    with restored_signal_handlers():
        trainer = make_trainer(tmp_path, demo_data, sets)
        StepRunner.train_step = train_step
        try:
            with count_host_syncs(events, current):
                summary = trainer.run()
        finally:
            StepRunner.train_step = original_step
    per_step = defaultdict(lambda: dict(mine=[], optim=[]))
    for step, name, in_optim, site in events:
        if step > 0:  # step 0: start-up (building, initialising)
            per_step[step]["optim" if in_optim else "mine"].append((name, site))
    return SimpleNamespace(
        per_step=per_step, returned=returned, summary=summary, work_dir=trainer.work_dir, events=events
    )


def test_no_host_sync_between_logging_steps(sync_run):
    """Outside the optimizer: zero host syncs per step, except one ``tolist`` at each logging step (4 and 8)."""
    counts = {step: sync_run.per_step[step]["mine"] for step in range(1, STEPS + 1)}
    for step, calls in counts.items():
        if step % LOG_EVERY:
            assert calls == [], f"step {step}: {calls}"
        else:
            assert len(calls) == 1, f"step {step}: {calls}"
            name, site = calls[0]
            assert name == "tolist" and site.startswith("internlm/train/metrics_reporter.py"), calls
    # every step's metrics line is written, with values read back at the logging steps
    losses = step_losses(sync_run.work_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    records = [r for r in read_metrics(sync_run.work_dir) if "loss" in r]
    for record in records:
        assert isinstance(record["loss"], float) and isinstance(record["grad_norm"], float)
        assert record["skipped"] is False and record["skipped_steps"] == 0
        assert record["tgs"] > 0 and record["step_time"] > 0
    assert sync_run.summary["loss"] == records[-1]["loss"]


def test_optimizer_step_sync_free(sync_run):
    """The optimizer's part: once ``optimizer.step()`` returns device tensors, it must not sync either."""
    grad_norm, skipped = sync_run.returned[0][1]  # train_step returns (loss, StepResult)
    if not isinstance(grad_norm, torch.Tensor):
        optim = {s: len(sync_run.per_step[s]["optim"]) for s in range(1, STEPS + 1)}
        pytest.skip(
            f"optimizer.step() still returns Python values (host syncs per step inside internlm/optim: {optim})"
        )
    for step in range(1, STEPS + 1):
        assert sync_run.per_step[step]["optim"] == [], f"step {step}: {sync_run.per_step[step]['optim']}"


def test_loader_label_tokens_are_host_ints(demo_data):
    """The loader counts label tokens from document boundaries: this rank's and the whole global batch's."""
    data = SimpleNamespace(
        train_folder={demo_data["docs"]: 0.7, demo_data["code"]: 0.3},
        seq_len=32,
        micro_bsz=2,
        micro_num=3,
        valid_folder=None,
        valid_ratio=0.0,
        block_seqs=64,
    )
    loaders = [build_train_loader(data, 5, r, 2) for r in range(2)]
    for _ in range(3):
        batches = [loader.next_global_batch() for loader in loaders]
        counted = [sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in batch) for batch in batches]
        for loader, batch, count in zip(loaders, batches, counted):
            assert type(loader.last_rank_label_tokens) is int and loader.last_rank_label_tokens == count
            assert type(loader.last_batch_label_tokens) is int and loader.last_batch_label_tokens == sum(counted)
            for mb in batch:
                assert mb["cu_seqlens_list"] == mb["cu_seqlens"].tolist()
                assert mb["label_tokens"] == int((mb["labels"] != IGNORE_INDEX).sum())


def test_model_forward_with_host_values_does_not_sync(monkeypatch):
    """sdpa over packed documents: no host sync with the loader's host values; the grouping is built once per
    micro-batch (not per layer); a bare cu_seqlens tensor costs one read-back per forward."""
    torch.manual_seed(0)
    model = InternLM(InternLMConfig.preset("internlm-tiny", num_layers=3, attn_backend="sdpa"))
    bounds = [0, 5, 9, 16, 24, 32]
    cu = torch.tensor(bounds, dtype=torch.int32)
    ids = torch.randint(0, 256, (1, 32))
    positions = torch.tensor(np.concatenate([np.arange(b - a) for a, b in zip(bounds[:-1], bounds[1:])]))[None]
    calls = []
    original = attention._document_groups
    monkeypatch.setattr(attention, "_document_groups", lambda *a, **k: calls.append(1) or original(*a, **k))
    reference = model(ids, cu_seqlens=cu)
    assert len(calls) == 1  # one forward, three layers: one grouping
    events = []
    docs = PackedDocs(cu, bounds, max_seqlen=8)
    with count_host_syncs(events, {"step": 1}):
        out = model(ids, cu_seqlens=docs, position_ids=positions)
        again = model(ids, cu_seqlens=cu, position_ids=positions, cu_seqlens_list=bounds, max_seqlen=8)
    assert events == []
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(again, reference)
    with count_host_syncs(events, {"step": 1}):
        model(ids, cu_seqlens=cu)  # research code passing tensors only: one read-back per forward
    assert [e[1] for e in events] == ["tolist"]
    # an unpacked batch needs no boundaries at all
    events.clear()
    with count_host_syncs(events, {"step": 1}):
        model(torch.randint(0, 256, (2, 8)))
    assert events == []


def test_stop_file_naming_a_later_step_is_exact(tmp_path, demo_data):
    """Stop requests are agreed on at logging steps only, yet a stop file naming a later step stops exactly there."""
    sets = ["monitor.log_every=4", "data.total_steps=12", "data.valid_ratio=0", "ckpt.checkpoint_every=100"]
    with restored_signal_handlers():
        trainer = make_trainer(tmp_path, demo_data, sets)
        request_stop(trainer.work_dir, after_step=6)  # read at step 4, honoured at step 6
        with pytest.raises(StopRequested, match="stopped after step 6"):
            trainer.run()
    assert sorted(step_losses(trainer.work_dir)) == list(range(1, 7))
    assert not os.path.exists(os.path.join(trainer.work_dir, "STOP"))


def test_sigterm_is_honoured_at_the_next_logging_step(tmp_path, demo_data):
    sets = ["monitor.log_every=4", "data.total_steps=12", "data.valid_ratio=0", "ckpt.checkpoint_every=100"]
    original_step = StepRunner.train_step

    def train_step(self, *args, step, **kwargs):
        if step == 5:
            trainer.stops.on_signal(signal.SIGTERM, None)
        return original_step(self, *args, step=step, **kwargs)

    with restored_signal_handlers():
        trainer = make_trainer(tmp_path, demo_data, sets)
        StepRunner.train_step = train_step
        try:
            with pytest.raises(StopRequested, match="stopped after step 8 on a stop signal"):
                trainer.run()
        finally:
            StepRunner.train_step = original_step
    assert sorted(step_losses(trainer.work_dir)) == list(range(1, 9))
    assert os.path.isfile(os.path.join(trainer.work_dir, "checkpoints", "8", "meta.json"))
