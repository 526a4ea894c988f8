"""Start-up: sharded initialisation (values independent of the layout, work proportional to the shard), no random
init before a checkpoint load, the process-group timeout, and the --dry-run start-up estimate."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from test_sync_free import make_trainer, restored_signal_handlers

from distributed_utils import run_distributed
from internlm.model import InternLM, InternLMConfig, modeling
from internlm.model.init import init_tile_shape
from internlm.parallel import Layout, init_parallel_context, parallelize_model, param_shards
from internlm.parallel.pipeline import build_pipeline_chunks
from internlm.train import distributed as train_distributed
from internlm.train.distributed import init_distributed, timeout_of
from internlm.train.stop import StopRequested
from train_utils import REPO, request_stop

SEED = 11


def _config(kv_heads: int) -> InternLMConfig:
    # tiles: hidden 128 -> 16, mlp 384 -> 24, kv 32 * kv_heads, vocab 512 -> 32 (pieces of tp <= 4 cover whole tiles)
    return InternLMConfig.preset(
        "internlm-tiny",
        hidden_size=128,
        num_layers=4,
        num_attention_heads=4,
        num_kv_attention_heads=kv_heads,
        vocab_size=512,
        multiple_of=64,
        dtype=torch.float32,
    )


def _shard_case(rank: int, world: int, tp: int, pp: int, kv_heads: int):
    """This rank's chunks built as the trainer does (meta -> pipeline split -> tensor shard -> to_empty -> init):
    the largest difference from the full single-device init sliced, and the number of values drawn."""
    layout = Layout.create(world, tensor=tp, pipeline=pp)
    pc = init_parallel_context(layout, rank)
    config = _config(kv_heads)
    full = InternLM(config)
    full_drawn = full.init_weights(SEED)
    full_params = dict(full.named_parameters())
    diff, drawn, held = 0.0, 0, 0
    for chunk in build_pipeline_chunks(config, pc.pp_rank, pc.pp_size, 1, device="meta"):
        parallelize_model(chunk, pc)
        chunk.to_empty(device="cpu")
        shards = param_shards(chunk)
        drawn += chunk.init_weights(SEED, shards)
        for name, param in chunk.named_parameters():
            expected = shards[name].slice(full_params[name])
            diff = max(diff, (param - expected).abs().max().item()) if param.shape == expected.shape else float("inf")
            if not name.endswith(("norm.weight", ".bias")):
                held += param.numel()
    return dict(diff=diff, drawn=drawn, held=held, full_drawn=full_drawn, tp_rank=pc.tp_rank, pp_rank=pc.pp_rank)


def _cases(rank, world):
    return {
        "tp2_pp2": _shard_case(rank, world, 2, 2, kv_heads=2),
        "tp4": _shard_case(rank, world, 4, 1, kv_heads=4),
        "tp4_replicated_kv": _shard_case(rank, world, 4, 1, kv_heads=2),
        "pp4": _shard_case(rank, world, 1, 4, kv_heads=2),
    }


@pytest.fixture(scope="module")
def shard_results():
    return run_distributed(_cases, 4)


@pytest.mark.parametrize("case", ["tp2_pp2", "tp4", "tp4_replicated_kv", "pp4"])
def test_sharded_init_equals_full_init_sliced(shard_results, case):
    for result in shard_results:
        assert result[case]["diff"] == 0.0, (case, result[case])


@pytest.mark.parametrize("case", ["tp2_pp2", "tp4", "tp4_replicated_kv", "pp4"])
def test_init_draws_only_the_shard(shard_results, case):
    """Each rank draws exactly the values of the weights it holds (no tile beyond its piece)."""
    for result in shard_results:
        assert result[case]["drawn"] == result[case]["held"], (case, result[case])


def test_tp4_shard_draws_a_quarter(shard_results):
    full = shard_results[0]["tp4"]["full_drawn"]
    for result in shard_results:
        assert result["tp4"]["drawn"] * 4 == full
    # pipeline stages hold disjoint layers, tp2 x pp2 pieces disjoint parts of them: the draws add up to the full
    # model's (kv 2 heads split over tp 2)
    for case in ("pp4", "tp2_pp2"):
        assert sum(r[case]["drawn"] for r in shard_results) == shard_results[0][case]["full_drawn"], case


@pytest.mark.parametrize("preset", ["internlm-7b", "internlm-20b", "internlm-104b"])
@pytest.mark.parametrize("tp", [2, 4, 8, 16])
def test_shipped_shapes_split_on_tile_boundaries(preset, tp):
    """Tensor pieces of the shipped models cover whole init tiles: sharded init draws nothing it discards."""
    cfg = InternLMConfig.preset(preset)
    h, f, kv, v = cfg.hidden_size, cfg.intermediate_size, cfg.kv_dim, cfg.vocab_size
    column = [(h, h), (f, h), (v, h)] + ([(kv, h)] if cfg.num_kv_attention_heads % tp == 0 else [])
    row = [(h, h), (h, f)]
    for shape in column:
        assert (shape[0] // tp) % init_tile_shape(shape)[0] == 0, (shape, tp)
    for shape in row:
        assert (shape[1] // tp) % init_tile_shape(shape)[1] == 0, (shape, tp)


def test_init_is_deterministic_per_seed_and_tile():
    a, b = InternLM(_config(2)), InternLM(_config(2))
    assert a.init_weights(3) == b.init_weights(3)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    b.init_weights(4)
    assert not torch.equal(a.layers["0"].mlp.up_proj.weight, b.layers["0"].mlp.up_proj.weight)
    # the tiles of one tensor are distinct draws
    w = a.layers["0"].self_attn.q_proj.weight
    tile = init_tile_shape(w.shape)
    assert not torch.equal(w[: tile[0], : tile[1]], w[: tile[0], tile[1] : 2 * tile[1]])


def test_resume_and_initial_weights_skip_random_init(tmp_path, demo_data, monkeypatch):
    """No random init of weights a checkpoint overwrites: resuming, or starting from ckpt.load_ckpt_folder."""
    calls = []
    original = modeling.InternLM.init_weights

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(modeling.InternLM, "init_weights", counting)
    common = ["data.valid_ratio=0", "data.total_steps=4"]
    with restored_signal_handlers():
        first = make_trainer(tmp_path / "a", demo_data, common)
        request_stop(first.work_dir, after_step=2)
        with pytest.raises(StopRequested):
            first.run()
        assert len(calls) == 1  # a fresh start initialises its chunk
        calls.clear()
        resumed = make_trainer(tmp_path / "a", demo_data, common)
        assert resumed.run()["step"] == 4 and calls == []
        checkpoint = os.path.join(first.work_dir, "checkpoints", "2")
        other = make_trainer(tmp_path / "b", demo_data, [*common, f"ckpt.load_ckpt_folder={checkpoint}"])
        assert other.run()["step"] == 4 and calls == []


def test_process_group_timeout(monkeypatch):
    """parallel.timeout_minutes reaches init_process_group (and init_parallel_context, see run.py / trainer.py)."""
    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: seen.update(kwargs, backend=backend))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(train_distributed.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(train_distributed, "_attempt_store", lambda timeout: ("store", timeout))
    init_distributed(timeout_of(45))
    store = ("store", timedelta(minutes=45))  # the rendezvous store is made with the same timeout
    assert seen == {"backend": "gloo", "timeout": timedelta(minutes=45), "store": store, "rank": 1, "world_size": 2}

    from internlm.config import load_run_config

    run = load_run_config(os.path.join(REPO, "configs", "internlm_104b", "phase1.py"))
    assert run.parallel.timeout_minutes == 30


def test_dry_run_prints_the_startup_estimate():
    files = [os.path.join(REPO, f"configs/internlm_104b/phase{i}.py") for i in (1, 2, 3)]
    env = dict(os.environ, PYTHONPATH=REPO)
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config", *files, "--dry-run", "--world-size", "2048"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "start-up estimate:" in line]
    assert len(lines) == 3
    line = lines[0]
    assert "s per device" in line and "(6.79B parameters)" in line and "extrapolated by parameter count" in line
    assert "hidden 10240" in line and "tensor rank 0 of 4" in line
    seconds = float(line.split("start-up estimate:")[1].split(" s per device")[0].replace(",", ""))
    assert seconds > 0
