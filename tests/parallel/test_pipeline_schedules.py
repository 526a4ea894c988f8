"""Pipeline schedules against the single-process model: loss and every parameter gradient.

Each multi-process run (gloo, spawn) executes several scenarios in one go to keep process start-up rare;
the test functions then compare the per-rank results with a single-process reference.
"""

import types

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from distributed_utils import run_distributed
from internlm.labels import IGNORE_INDEX
from internlm.model import InternLM, InternLMConfig, positions_from_cu_seqlens
from internlm.parallel.pipeline import (
    InterleavedSchedule,
    NoPipelineSchedule,
    OneFOneBSchedule,
    build_pipeline_chunks,
    build_schedule,
)

SEQ = 32
RTOL = 1e-5
# name -> (num_layers, num_chunks, overlap, micro_num)
PP2 = {
    "1f1b": (4, 1, False, 4),
    "interleaved": (4, 2, False, 4),
    "interleaved_overlap": (4, 2, True, 4),
    "interleaved_m_eq_pp": (4, 2, True, 2),
    "interleaved_3chunks": (6, 3, False, 4),
}
PP4 = {
    "1f1b": (4, 1, False, 4),
    "1f1b_m_lt_pp": (4, 1, False, 2),
    "interleaved_overlap": (8, 2, True, 8),
}


def _config(num_layers):
    return InternLMConfig.preset("internlm-tiny", num_layers=num_layers, dtype=torch.float32)


def _micro_batches(num):
    """Packed micro-batches of SEQ tokens, each with 2-3 documents; -100 on every document's last token."""
    gen = torch.Generator().manual_seed(1234)
    out = []
    for i in range(num):
        cuts = sorted(torch.randperm(SEQ - 2, generator=gen)[: 1 + i % 2].add(1).tolist())
        cu = torch.tensor([0, *cuts, SEQ], dtype=torch.int32)
        ids = torch.randint(0, 256, (1, SEQ), generator=gen)
        labels = torch.roll(ids, -1, dims=1)
        labels[0, cu[1:].long() - 1] = IGNORE_INDEX
        out.append(
            dict(
                input_ids=ids,
                labels=labels,
                cu_seqlens=cu,
                position_ids=positions_from_cu_seqlens(cu, SEQ).view(1, -1),
                max_seqlen=int((cu[1:] - cu[:-1]).max()),
            )
        )
    return out


def _loss_fn(logits, labels):
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def _loss_scale(micro_batches):
    return 1.0 / sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in micro_batches)


def _reference(num_layers, micro_num):
    """Single-process loss and gradients, written out without any schedule code."""
    model = InternLM(_config(num_layers))
    mbs = _micro_batches(micro_num)
    scale, total = _loss_scale(mbs), 0.0
    for mb in mbs:
        logits = model(
            mb["input_ids"], cu_seqlens=mb["cu_seqlens"], position_ids=mb["position_ids"], max_seqlen=mb["max_seqlen"]
        )
        loss_sum = _loss_fn(logits, mb["labels"])
        (loss_sum * scale).backward()
        total += float(loss_sum.detach())
    return total, {n: p.grad.clone() for n, p in model.named_parameters()}


def _pipeline_worker(rank, world_size, scenarios):
    group = dist.new_group(list(range(world_size)))
    pc = types.SimpleNamespace(
        pp_size=world_size,
        pp_rank=rank,
        pp_group=group,
        tp_size=1,
        sequence_parallel=False,
        pp_prev_rank=rank - 1 if rank > 0 else None,
        pp_next_rank=rank + 1 if rank < world_size - 1 else None,
    )
    results = {}
    for name, (num_layers, num_chunks, overlap, micro_num) in scenarios.items():
        config = _config(num_layers)
        chunks = build_pipeline_chunks(config, rank, world_size, num_chunks)
        for chunk in chunks:
            chunk.to_empty(device="cpu")
            chunk.init_weights(0)
        schedule = build_schedule(pc, num_chunks, 1, SEQ, config.hidden_size, config.dtype, overlap)
        mbs = _micro_batches(micro_num)
        loss = schedule.forward_backward(chunks, mbs, _loss_fn, _loss_scale(mbs))
        grads = {n: p.grad.clone() for c in chunks for n, p in c.named_parameters()}
        peak = schedule.peak_activations
        eval_loss = schedule.forward_backward(chunks, mbs, _loss_fn, _loss_scale(mbs), forward_only=True)
        grads_untouched = all(torch.equal(p.grad, grads[n]) for c in chunks for n, p in c.named_parameters())
        results[name] = dict(
            loss=loss,
            eval_loss=eval_loss,
            grads=grads,
            peak=peak,
            kind=type(schedule).__name__,
            grads_untouched=grads_untouched,
        )
    return results


@pytest.fixture(scope="module")
def pp2_results():
    return run_distributed(_pipeline_worker, 2, PP2)


@pytest.fixture(scope="module")
def pp4_results():
    return run_distributed(_pipeline_worker, 4, PP4)


def _check_against_reference(per_rank, name, scenarios):
    num_layers, num_chunks, _, micro_num = scenarios[name]
    ref_loss, ref_grads = _reference(num_layers, micro_num)
    results = [r[name] for r in per_rank]
    assert results[0]["kind"] == ("OneFOneBSchedule" if num_chunks == 1 else "InterleavedSchedule")
    loss = sum(float(r["loss"]) for r in results)
    eval_loss = sum(float(r["eval_loss"]) for r in results)
    assert all(r["loss"].dtype == torch.float32 and r["loss"].dim() == 0 for r in results)
    assert sum(float(r["loss"]) != 0.0 for r in results) == 1  # only the head's rank reports a loss
    assert abs(loss - ref_loss) <= RTOL * abs(ref_loss)
    assert abs(eval_loss - ref_loss) <= RTOL * abs(ref_loss)
    assert all(r["grads_untouched"] for r in results)
    grads = {}
    for r in results:
        assert not set(grads) & set(r["grads"]), "a parameter is owned by two stages"
        grads.update(r["grads"])
    assert set(grads) == set(ref_grads)
    worst = 0.0
    for n, ref in ref_grads.items():
        err = float((grads[n] - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        assert err <= RTOL, f"{name}: gradient of {n} differs by {err:.2e} relative"
        worst = max(worst, err)
    pp = len(results)
    if num_chunks > 1:  # interleaved warm-up 2 (pp - r - 1) + (V - 1) pp forwards, plus the steady one
        expected = [min(2 * (pp - r - 1) + (num_chunks - 1) * pp + 1, micro_num * num_chunks) for r in range(pp)]
        assert [r["peak"] for r in results] == expected
    print(
        f"{name}: peaks {[r['peak'] for r in results]}, loss rel err {abs(loss - ref_loss) / ref_loss:.1e}, "
        f"worst grad rel err {worst:.1e}"
    )
    return results


@pytest.mark.parametrize("name", list(PP2))
def test_pp2_matches_single_process(pp2_results, name):
    results = _check_against_reference(pp2_results, name, PP2)
    if name == "1f1b":
        assert [r["peak"] for r in results] == [2, 1]  # stage r holds at most pp - r micro-batches


@pytest.mark.parametrize("name", list(PP4))
def test_pp4_matches_single_process(pp4_results, name):
    results = _check_against_reference(pp4_results, name, PP4)
    micro_num = PP4[name][3]
    if name.startswith("1f1b"):
        assert [r["peak"] for r in results] == [min(4 - rank, micro_num) for rank in range(4)]


def test_no_pipeline_schedule_matches_reference():
    ref_loss, ref_grads = _reference(4, 4)
    model = InternLM(_config(4))
    mbs = _micro_batches(4)
    loss = NoPipelineSchedule().forward_backward([model], mbs, _loss_fn, _loss_scale(mbs))
    assert abs(float(loss) - ref_loss) <= RTOL * ref_loss
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=RTOL, atol=0)
    with torch.no_grad():
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    eval_loss = NoPipelineSchedule().forward_backward([model], mbs, _loss_fn, 1.0, forward_only=True)
    assert abs(float(eval_loss) - ref_loss) <= RTOL * ref_loss
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())


def test_build_schedule_picks_and_sizes():
    single = types.SimpleNamespace(
        pp_size=1, pp_rank=0, pp_group=None, pp_prev_rank=None, pp_next_rank=None, tp_size=1, sequence_parallel=False
    )
    assert isinstance(build_schedule(single, 1, 2, 16, 64, torch.float32), NoPipelineSchedule)
    with pytest.raises(ValueError, match="model.num_chunks"):
        build_schedule(single, 2, 2, 16, 64, torch.float32)
    # ring neighbours given explicitly (no group): shapes shrink by tp under sequence parallelism
    pc = types.SimpleNamespace(
        pp_size=4, pp_rank=0, pp_group=None, pp_prev_rank=3, pp_next_rank=1, tp_size=2, sequence_parallel=True
    )
    s = build_schedule(pc, 1, 2, 16, 64, torch.bfloat16)
    assert isinstance(s, OneFOneBSchedule) and s.p2p.tensor_shape == (1, 16, 64) and s.p2p.dtype == torch.bfloat16
    pc.sequence_parallel = False
    s = build_schedule(pc, 2, 2, 16, 64, torch.float32, overlap=True)
    assert isinstance(s, InterleavedSchedule) and s.p2p.tensor_shape == (1, 32, 64) and s.overlap


def test_interleaved_order_and_warmup():
    pc = types.SimpleNamespace(
        pp_size=2, pp_rank=1, pp_group=None, pp_prev_rank=0, pp_next_rank=0, tp_size=1, sequence_parallel=False
    )
    s = InterleavedSchedule(pc, 2, (1, 8, 4), torch.float32)
    # pp micro-batches through chunk 0, then the same through chunk 1, then the next group
    assert [s.forward_position(k) for k in range(8)] == [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    assert [s.backward_position(k) for k in range(4)] == [(1, 0), (1, 1), (0, 0), (0, 1)]
    assert s.warmup_steps(8, False) == 2  # last rank: (V - 1) * pp
    pc.pp_rank = 0
    assert InterleavedSchedule(pc, 2, (1, 8, 4), torch.float32).warmup_steps(8, False) == 4
    with pytest.raises(ValueError, match="num_chunks >= 2"):
        InterleavedSchedule(pc, 1, (1, 8, 4), torch.float32)
