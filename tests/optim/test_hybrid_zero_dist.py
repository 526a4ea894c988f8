"""HybridZeroOptimizer on several gloo processes against the single-process torch AdamW + clip reference.

Layouts: dp2 zero1=2, dp4 zero1=2 (two zero1 subgroups), dp4 zero1=4, and tp2 x dp2 zero1=2 with sharded,
duplicated and partial-gradient parameters. Every data-parallel rank back-propagates its part of the global
batch with the loss normalised by the global token count.
"""

from __future__ import annotations

import io
import math
import time
from typing import List

import pytest
import torch

from distributed_utils import run_distributed
from internlm.optim import HybridZeroOptimizer
from zero_utils import (
    HYPER,
    IN,
    OUT,
    Quadratic,
    backward_step,
    make_context,
    make_opt,
    max_rel_error,
    reference_run,
    snapshot,
    tiny_model,
    train_zero,
)

STEPS = 4


# ---------------------------------------------------------------------- data parallel
def _dp_worker(rank: int, world: int, zero1: int, overlaps: List[bool], nan_first: bool, resume: bool) -> List[dict]:
    pc = make_context(rank, world, 1, zero1)
    results = []
    for overlap in overlaps:
        model = tiny_model()
        opt = make_opt(model, pc, overlap_sync_grad=overlap, overlap_sync_param=overlap)
        if nan_first:  # only the last rank sees a NaN; every rank must skip
            opt.begin_step(2)
            backward_step(model, 99, pc.dp_rank, pc.dp_size, 2, loss_scale=math.nan if rank == world - 1 else 1.0)
            norm, skipped = opt.step()
            assert skipped and math.isnan(norm)
        split = 2 if resume else STEPS
        norms = train_zero(model, opt, range(split), pc.dp_rank, pc.dp_size)
        if resume:  # continue on a fresh model + optimizer restored from this rank's shard
            blob = io.BytesIO()
            torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, blob)
            blob.seek(0)
            saved = torch.load(blob, weights_only=False)
            model = tiny_model()
            model.load_state_dict(saved["model"])
            opt = make_opt(model, pc, overlap_sync_grad=overlap, overlap_sync_param=overlap)
            opt.load_state_dict(saved["optim"])
            norms += train_zero(model, opt, range(split, STEPS), pc.dp_rank, pc.dp_size)
        results.append(
            dict(params=snapshot(model), norms=norms, skipped=opt.skipped_steps, state_bytes=opt.optim_state_bytes())
        )
    return results


@pytest.fixture(scope="module")
def reference():
    ref, norms = reference_run(STEPS)
    single = make_opt(tiny_model())
    return dict(params=ref, norms=norms, state_bytes=single.optim_state_bytes())


@pytest.mark.parametrize(
    "world,zero1,overlaps,nan_first,resume",
    [
        (2, 2, [True], True, True),  # skip rule across ranks + checkpoint round trip
        (4, 2, [True], False, False),  # hybrid: two zero1 subgroups of two
        (4, 4, [True, False], False, False),  # full sharding, overlap on and off
    ],
)
def test_data_parallel_matches_single_process(reference, world, zero1, overlaps, nan_first, resume):
    per_rank = run_distributed(_dp_worker, world, zero1, overlaps, nan_first, resume)
    for rank_results in per_rank:
        for result in rank_results:
            assert max_rel_error(result["params"], reference["params"]) < 1e-5
            for a, b in zip(result["norms"], reference["norms"]):
                assert abs(a - b) <= 1e-5 * b
            assert result["skipped"] == (1 if nan_first else 0)
            # optimizer state is 1/zero1 of the single-process state, plus at most ALIGN elements per buffer
            ratio = result["state_bytes"] / reference["state_bytes"]
            assert 1 / zero1 <= ratio <= 1 / zero1 + 0.01
            if zero1 == 4:
                assert ratio <= 0.30, f"{result['state_bytes']} vs {reference['state_bytes']}"
        if len(rank_results) == 2:  # overlap on and off: same arithmetic, same order of sums
            for name, value in rank_results[0]["params"].items():
                assert torch.equal(value, rank_results[1]["params"][name])
    replicas = [results[0]["params"] for results in per_rank]  # dp replicas (also across zero1 groups) agree
    for other in replicas[1:]:
        assert all(torch.equal(replicas[0][n], other[n]) for n in other)


# ---------------------------------------------------------------------- tensor parallel shards
def _tp_worker(rank: int, world: int) -> dict:
    pc = make_context(rank, world, 2, 2)
    model = Quadratic(pc.tp_rank, pc.tp_size)
    opt = HybridZeroOptimizer([model], pc, **HYPER)
    norms = []
    for step in range(STEPS):
        opt.begin_step(1)
        loss = model(step, pc.dp_rank, pc.dp_size)
        assert not opt.param_sync_pending  # the forward pre-hook waited for the previous step's gather
        loss.backward()
        norms.append(float(opt.step()[0]))
        assert opt.param_sync_pending  # overlap_sync_param: the gather runs until the next forward
    opt.sync_params()
    meta = {p["name"]: p for b in opt.state_dict()["buffers"] for p in b["params"]}
    return dict(tp_rank=pc.tp_rank, params=snapshot(model), norms=norms, weight_meta=meta["weight"])


def test_tensor_parallel_shards_match_single_process():
    model = Quadratic()
    decay = torch.optim.AdamW(
        [
            {"params": [model.weight], "weight_decay": HYPER["weight_decay"]},
            {"params": [model.bias, model.gain], "weight_decay": 0.0},
        ],
        lr=HYPER["lr"],
        betas=HYPER["betas"],
        eps=HYPER["eps"],
    )
    ref_norms = []
    for step in range(STEPS):
        decay.zero_grad()
        model(step).backward()
        ref_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), HYPER["clip_grad_norm"])))
        decay.step()
    ref = snapshot(model)

    for result in run_distributed(_tp_worker, 4):
        tp_rank = result["tp_rank"]
        expected = dict(ref, weight=ref["weight"].chunk(2, 0)[tp_rank])
        assert max_rel_error(result["params"], expected) < 1e-5
        for a, b in zip(result["norms"], ref_norms):
            assert abs(a - b) <= 1e-5 * b
        assert result["weight_meta"]["global_shape"] == [OUT, IN]
        assert result["weight_meta"]["tp_shard"] == (0, tp_rank, 2)


# ---------------------------------------------------------------------- parameter gathers per bucket
def _gather_worker(rank: int, world: int) -> dict:
    pc = make_context(rank, world, 1, world)
    model = tiny_model()
    opt = make_opt(model, pc)
    train_zero(model, opt, range(1), pc.dp_rank, pc.dp_size)
    opt.begin_step(1)
    backward_step(model, 1, pc.dp_rank, pc.dp_size, 1)
    opt.step()  # launches one all-gather per bucket
    gathers = opt.gatherer.gathers
    launched = sum(g.pending for g in gathers)
    embedding = [g for g in gathers if _touches(g, model.embed_tokens.weight)]
    model.embed_tokens(torch.zeros(1, 4, dtype=torch.long))  # the first layer's pre-hook completes its buckets only
    after_embedding = dict(
        embedding_pending=sum(g.pending for g in embedding), others_pending=sum(g.pending for g in gathers)
    )
    backward_step(model, 2, pc.dp_rank, pc.dp_size, 1)  # full forward (+ a backward, dropped below)
    pending_after_forward = opt.param_sync_pending
    opt.zero_grad()
    return dict(launched=launched, buckets=len(gathers), pending_after_forward=pending_after_forward, **after_embedding)


def _touches(gather, param) -> bool:
    for slot in gather.buffer.slots:
        if slot.param is param:
            return any(piece.bucket == gather.bucket for piece in gather.buffer.grad_pieces(slot))
    return False


def test_parameter_gathers_are_waited_for_per_bucket_by_the_modules_that_need_them():
    for result in run_distributed(_gather_worker, 2):
        assert result["launched"] == result["buckets"] > 2
        assert result["embedding_pending"] == 0 and result["others_pending"] > 0, result
        assert not result["pending_after_forward"]


# ---------------------------------------------------------------------- timing independence
SLOW = (0.02, 0.002)  # seconds a slowed rank sleeps before each forward and after each gradient hook


def _timing_worker(rank: int, world: int, schedules: List[List[int]]) -> List[dict]:
    """dp4 zero1=2 with both overlaps: train 3 steps once per schedule; in each, the listed ranks are slowed
    (``SLOW``), so buckets launch, reduce-scatters complete and parameter gathers land at other moments."""
    pc = make_context(rank, world, 1, 2)
    results = []
    for slow_ranks in schedules:
        model = tiny_model()
        opt = make_opt(model, pc, overlap_sync_grad=True, overlap_sync_param=True)
        handles = []
        if rank in slow_ranks:  # registered after the optimizer's hooks: runs once they have launched buckets
            handles = [
                p.register_post_accumulate_grad_hook(lambda _: time.sleep(SLOW[1]))
                for p in model.parameters()
                if p.requires_grad
            ]
            handles.append(model.register_forward_pre_hook(lambda *_: time.sleep(SLOW[0])))
        norms = train_zero(model, opt, range(3), pc.dp_rank, pc.dp_size)
        for handle in handles:
            handle.remove()
        results.append(dict(params=snapshot(model), norms=norms))
        opt.close()
    return results


def test_results_do_not_depend_on_rank_timing():
    """Asynchronous bucket reductions and parameter gathers give bit-identical parameters and norms whichever
    ranks run late: every sum has a fixed order, and no buffer is read before its collective is waited for."""
    schedules = [[], [0, 2], [1, 3], [3]]
    for rank, results in enumerate(run_distributed(_timing_worker, 4, schedules)):
        first = results[0]
        for slow_ranks, result in zip(schedules[1:], results[1:]):
            assert result["norms"] == first["norms"], (rank, slow_ranks)
            for name, value in first["params"].items():
                assert torch.equal(result["params"][name], value), (rank, slow_ranks, name)
