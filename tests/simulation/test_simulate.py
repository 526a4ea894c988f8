"""`train.py --simulate`: ranks of the shipped configs run their real training step on a fake process group and
fake CPU tensors; bytes per dimension within 5% and peak memory within 10% of `internlm.planning`, and the
sends of every pipeline stage meet the receives of the next (a mismatch is reported as a deadlock): the 104B's
first, middle and last stage on 2,048 ranks, every stage of a 20B-shaped tp4 x pp4 (interleaved) x dp2 + SP
pipeline on 32, every rank of the 7B on 8 through the command line (its eight ranks run the same stage and differ
only in which files of a checkpoint they write: rank 7 writes the model).

micro_num is lowered (``--set data.micro_num=...``) to keep the suite short; the layouts are the configs' own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from internlm.model import InternLM, InternLMConfig
from internlm.simulation import LiveStorages, check_pipeline, default_ranks, simulate_rank
from internlm.simulation.report import disagreements
from internlm.train.cli import load_phases
from train_utils import REPO

HERE = os.path.dirname(os.path.abspath(__file__))


def _phase(config: str, world: int, *sets: str):
    _, phases = load_phases(["--config", config, "--world-size", str(world), "--set", *sets])
    return phases[0]


def _pipeline(config: str, world: int, *sets: str):
    phase = _phase(config, world, *sets)
    ranks = [phase.layout.rank_of(0, 0, stage) for stage in range(phase.layout.pipeline)]
    return phase, [simulate_rank(phase, world, rank) for rank in ranks]


@pytest.fixture(scope="module")
def stages_104b():
    """The 104B's first rank of its first, a middle and its last pipeline stage (`default_ranks`)."""
    phase = _phase(os.path.join(REPO, "configs/internlm_104b/phase1.py"), 2048, "data.micro_num=4")
    return phase, [simulate_rank(phase, 2048, rank) for rank in default_ranks(phase.layout)]


@pytest.fixture(scope="module")
def pipeline_20b():
    return _pipeline(os.path.join(HERE, "internlm_20b_tp4_pp4.py"), 32, "data.micro_num=4")


def test_104b_first_middle_last_stage_on_2048_match_the_planner(stages_104b):
    phase, results = stages_104b
    assert [r.coords["pipeline"] for r in results] == sorted({0, phase.layout.pipeline // 2, phase.layout.pipeline - 1})
    for result in results:
        assert disagreements(result) == []
        assert result.checkpoint_bytes == pytest.approx(result.prediction.checkpoint_bytes, rel=0.05)
    assert check_pipeline(results) == []


def test_20b_tp4_pp4_interleaved_sp_on_32_matches_the_planner(pipeline_20b):
    phase, results = pipeline_20b
    assert phase.layout.num_chunks == 2 and phase.layout.sequence_parallel
    for result in results:
        assert disagreements(result) == []
    assert check_pipeline(results) == []


@pytest.mark.parametrize("mode", ["ring", "a2a"])
def test_7b_long_context_rank_matches_the_planner(mode):
    """The 7B's long-context phase (tensor 2 x context 4) on 8 ranks, shortened to 4 layers, 2,048 tokens and one
    micro-batch: context rank 1 records its ring sends or all-to-alls as context bytes, as the planner counts them,
    and writes no checkpoint file (context rank 0 does)."""
    config = os.path.join(REPO, "configs/internlm_7b/phase3.py")
    sets = ("model.num_layers=4", "data.seq_len=2048", "data.micro_num=1", f"parallel.context_mode={mode}")
    phase = _phase(config, 8, *sets)
    result = simulate_rank(phase, 8, phase.layout.rank_of(0, 0, 0, cp_rank=1))
    assert result.coords["context"] == 1 and result.bytes["context"] > 0
    assert disagreements(result) == [] and result.checkpoint_bytes == result.prediction.checkpoint_bytes == 0


def test_a_mismatched_send_is_reported_as_a_deadlock(pipeline_20b):
    _, results = pipeline_20b
    first, second = results[0], results[1]
    sends = [i for i, op in enumerate(first.ops) if op.kind == "isend" and op.peer == second.rank]
    wrong = list(first.ops)
    wrong[sends[2]] = dataclasses.replace(wrong[sends[2]], shape=(1, 7, 5120))
    problems = check_pipeline([dataclasses.replace(first, ops=wrong), second])
    assert len(problems) == 1 and "message" in problems[0] and f"rank {first.rank}" in problems[0]
    del wrong[sends[2]]
    problems = check_pipeline([dataclasses.replace(first, ops=wrong), second])
    assert "deadlock" in problems[0]


def _simulate_7b(ranks: str, *extra: str) -> subprocess.CompletedProcess:
    """``train.py --simulate`` of the shipped 7B's first phase on a world of 8, as a user types it."""
    cmd = [sys.executable, "train.py", "--config", "configs/internlm_7b/phase1.py", "--simulate"]
    cmd += ["--world-size", "8", "--ranks", ranks, *extra]
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_cli_simulates_the_7b_on_world_8_and_writes_the_report(tmp_path):
    report = tmp_path / "sim.json"
    out = _simulate_7b(",".join(str(rank) for rank in range(8)), "--report", str(report), "--set", "data.micro_num=1")
    assert out.returncode == 0, out.stderr
    assert "disagreement" not in out.stdout and "deadlock" not in out.stdout
    data = json.loads(report.read_text())
    assert data["world_size"] == 8 and [r["rank"] for r in data["ranks"]] == list(range(8))
    for entry in data["ranks"]:
        for key in ("coords", "bytes", "bytes_model", "peak_memory_bytes", "peak_memory_model_bytes"):
            assert key in entry
        for dim, value in entry["bytes_model"].items():
            assert abs(entry["bytes"][dim] - value) <= 0.05 * max(value, 1.0)
        assert abs(entry["peak_memory_bytes"] / entry["peak_memory_model_bytes"] - 1) <= 0.10
        assert abs(entry["checkpoint_bytes"] / entry["checkpoint_bytes_model"] - 1) <= 0.05
        assert entry["num_ops"] == len(entry["ops"]) > 0
        assert {op["dimension"] for op in entry["ops"]} == {"data_gradients", "data_params"}


def test_bad_ranks_exit_2():
    out = _simulate_7b("0,9")
    assert out.returncode == 2 and "--ranks" in out.stderr


def _tiny_step_peak(fake: bool) -> int:
    """Peak live storages of a small InternLM's forward, backward and fused AdamW step, real or fake."""
    torch.manual_seed(0)
    memory = LiveStorages()
    with contextlib.ExitStack() as stack:
        if fake:
            stack.enter_context(FakeTensorMode())
        stack.enter_context(memory)
        model = InternLM(InternLMConfig.preset("internlm-tiny", num_layers=2, attn_backend="sdpa"))
        opt = torch.optim.AdamW(model.parameters(), fused=True)
        ids = torch.randint(0, 256, (1, 64))
        for _ in range(2):
            memory.reset_peak()
            model(ids).float().square().mean().backward()
            opt.step()
            opt.zero_grad()
    return memory.peak


def test_live_storages_count_fake_tensors_as_real_ones():
    real, fake = _tiny_step_peak(False), _tiny_step_peak(True)
    assert real > 0 and fake == real
