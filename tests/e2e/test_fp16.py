"""fp16 with dynamic loss scaling (grad_scaler section): the scaler's rules, overflow steps skipped without
touching the optimizer, the scale in checkpoints and metrics, exact resume, and tp2 / pp2 equal to one process."""

import os
import shutil

import pytest
import torch
from torch import nn

from internlm.checkpoint import merge_model_checkpoint
from internlm.optim import DynamicGradScaler, HybridZeroOptimizer
from internlm.optim.full_state import ShardedFullState
from internlm.parallel import ParallelContext
from train_utils import copy_run, read_metrics, run_train, write_base


def _scaler(**kw):
    args = dict(initial_scale=16.0, min_scale=2.0, growth_interval=3, growth_factor=2.0, backoff_factor=0.5)
    args.update(max_scale=64.0, hysteresis=2)
    args.update(kw)
    return DynamicGradScaler(**args)


def _run(scaler, flags):
    out = []
    for flag in flags:
        scaler.update(torch.tensor(flag))
        out.append(float(scaler.scale))
    return out


def test_scaler_growth_backoff_hysteresis_bounds():
    # growth after growth_interval clean steps, capped at max_scale
    assert _run(_scaler(), [False] * 9) == [16, 16, 32, 32, 32, 64, 64, 64, 64]
    # hysteresis 2: the first overflow does not back off, the second does, and every later one again
    assert _run(_scaler(), [True, True, True]) == [16, 8, 4]
    # overflows count since the last growth, not consecutively (InternLM's DynamicGradScaler)
    assert _run(_scaler(), [True, False, True]) == [16, 16, 8]
    # a growth resets the overflow count; backoff stops at min_scale
    assert _run(_scaler(), [True, False, False, False, True]) == [16, 16, 16, 32, 32]
    assert _run(_scaler(hysteresis=1), [True] * 5) == [8, 4, 2, 2, 2]
    scaler = _scaler(hysteresis=1)
    _run(scaler, [True, False, True])
    assert int(scaler.overflow_steps) == 2
    state = scaler.state_dict()
    assert state == dict(scale=4.0, growth_tracker=0, hysteresis_tracker=2, overflow_steps=2)
    other = _scaler(hysteresis=1)
    other.load_state_dict(state)
    assert other.state_dict() == state


def _fp16_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 16)).half()


def _step(model, opt, x):
    opt.begin_step(1)
    (model(x).float().pow(2).mean() * opt.loss_scale).backward()
    return opt.step()


def test_overflow_step_is_skipped_without_touching_optimizer_state():
    model = _fp16_model()
    scaler = DynamicGradScaler(initial_scale=2.0**10, min_scale=1.0, growth_interval=100, hysteresis=1)
    opt = HybridZeroOptimizer([model], ParallelContext(), lr=1e-2, grad_scaler=scaler)
    x = torch.randn(4, 16).half()
    result = _step(model, opt, x)
    assert not bool(result.skipped) and not bool(result.overflow)
    before = opt.state_dict()
    params = [p.detach().clone() for p in model.parameters()]
    result = _step(model, opt, x * 3e4)  # fp16 gradients overflow at this scale
    assert bool(result.skipped) and bool(result.overflow) and not bool(result.nonfinite)
    assert float(result.loss_scale) == 2.0**9 and int(scaler.overflow_steps) == 1
    after = opt.state_dict()
    assert after["num_updates"] == before["num_updates"] == 1 and opt.skipped_steps == 1
    for a, b in zip(before["buffers"], after["buffers"]):
        for key in ("master", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a[key], b[key]), key
    for p, q in zip(params, model.parameters()):
        assert torch.equal(p, q)
    # at min_scale an overflow is no longer routine: it is reported as non-finite
    scaler.scale.fill_(1.0)
    result = _step(model, opt, x * 6e4)
    assert bool(result.skipped) and not bool(result.overflow) and bool(result.nonfinite)


def test_unscaled_step_equals_fp32_math():
    """The update and the reported grad norm do not depend on the loss scale (powers of two are exact)."""
    torch.manual_seed(1)
    x = torch.randn(4, 16).half()
    results = []
    for scale in (1.0, 2.0**12):
        model = _fp16_model()
        opt = HybridZeroOptimizer(
            [model],
            ParallelContext(),
            lr=1e-2,
            grad_scaler=_scaler(initial_scale=scale, min_scale=1.0, max_scale=2.0**24),
        )
        norm, _ = _step(model, opt, x)
        results.append((float(norm), [p.detach().clone() for p in model.parameters()]))
    # Multiplying by a power of two and dividing by it again is exact in fp16 and fp32 as long as nothing under- or
    # overflows (these gradients stay far from both), so norm and weights are equal, not close: measured identical
    # over 5 inputs. (The former 1e-3 and atol 2e-3, a fifth of an Adam step of lr 1e-2, passed a wrong unscale.)
    assert results[0][0] == results[1][0]
    for p, q in zip(results[0][1], results[1][1]):
        assert torch.equal(p, q)


def test_scale_travels_with_optimizer_state_and_resharding():
    model = _fp16_model()
    scaler = _scaler(initial_scale=2.0**10, max_scale=2.0**24, hysteresis=1)
    opt = HybridZeroOptimizer([model], ParallelContext(), lr=1e-2, grad_scaler=scaler)
    _step(model, opt, torch.randn(4, 16).half())
    _step(model, opt, torch.randn(4, 16).half() * 3e4)
    state = opt.state_dict()
    assert state["grad_scaler"]["scale"] == 2.0**9 and state["grad_scaler"]["overflow_steps"] == 1
    for load in ("same layout", "resharded"):
        other = HybridZeroOptimizer(
            [_fp16_model()], ParallelContext(), lr=1e-2, grad_scaler=_scaler(max_scale=2.0**24, hysteresis=1)
        )
        if load == "same layout":
            other.load_state_dict(state)
        else:
            other.load_full_state(ShardedFullState([("shard", state)]))
        assert other.grad_scaler.state_dict() == scaler.state_dict(), load


FP16 = ["model.dtype=torch.float16", "grad_scaler.fp16.growth_interval=2", "data.total_steps=6"]


def _losses(work_dir):
    return {r["step"]: r for r in read_metrics(work_dir) if "loss" in r}


@pytest.fixture(scope="module")
def fp16_reference(tmp_path_factory, demo_data):
    root = tmp_path_factory.mktemp("fp16_single")
    work_dir = str(root / "run")
    run_train([write_base(str(root / "cfg"), demo_data, work_dir)], sets=FP16)
    return work_dir


def test_fp16_resume_is_exact_with_the_scale(fp16_reference, tmp_path, demo_data):
    """Checkpoint 3 holds the grown scale; resuming from it reproduces steps 4-6 (loss, grad norm, scale, overflow
    count) and the final weights exactly."""
    work_dir, config = copy_run(fp16_reference, str(tmp_path), demo_data)  # the module's fp16 run, copied
    ref = _losses(work_dir)
    assert [ref[s]["loss_scale"] for s in (1, 2, 3, 4)] == [2.0**16, 2.0**17, 2.0**17, 2.0**18]
    final = merge_model_checkpoint(os.path.join(work_dir, "checkpoints", "6"))
    shutil.rmtree(os.path.join(work_dir, "checkpoints", "6"))
    out = run_train([config], sets=FP16)  # resumes from checkpoint 3
    assert "resumed from" in out.stdout
    cut = _losses(work_dir)
    for step in range(1, 7):
        for key in ("loss", "grad_norm", "loss_scale", "overflow_steps"):
            assert cut[step][key] == ref[step][key], (step, key)
    for name, tensor in merge_model_checkpoint(os.path.join(work_dir, "checkpoints", "6")).items():
        assert torch.equal(tensor, final[name]), name


# fp16 keeps 11 significant bits (relative rounding 2^-11 = 4.9e-4 per operation); tensor and pipeline
# parallelism change the order of sums and where activations are rounded to fp16, so per-step losses may differ
# by about two roundings: 1e-3 relative (the fp32 matrix allows 1e-4); grad norms, a sum over every parameter,
# 1e-2. Measured on CPU (gloo): tp2 1.8e-5, pp2 0 (the pipeline split rounds at the same places).
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_fp16_layout_matches_single_process(layout, fp16_reference, tmp_path, demo_data):
    sets = {"tp2": ["parallel.tensor=2"], "pp2": ["parallel.pipeline.size=2"]}[layout]
    work_dir = str(tmp_path / "run")
    run_train([write_base(str(tmp_path / "cfg"), demo_data, work_dir)], nproc=2, sets=FP16 + sets, timeout=600)
    ref, got = _losses(fp16_reference), _losses(work_dir)
    assert sorted(got) == list(range(1, 7))
    worst = max(abs(got[s]["loss"] - ref[s]["loss"]) / ref[s]["loss"] for s in got)
    print(f"{layout}: largest relative loss difference to one process {worst:.2e}")
    for step in got:
        assert abs(got[step]["loss"] - ref[step]["loss"]) <= 1e-3 * ref[step]["loss"], (layout, step)
        assert abs(got[step]["grad_norm"] - ref[step]["grad_norm"]) <= 1e-2 * ref[step]["grad_norm"], (layout, step)
        assert got[step]["loss_scale"] == ref[step]["loss_scale"]
