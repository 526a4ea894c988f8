"""HybridZeroOptimizer in a single process: against torch AdamW + clip_grad_norm_, skip rule, bf16, checkpoints.

The helpers (tiny model, batches, training loop, contexts) are in tests/zero_utils.py.
"""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import pytest
import torch

from internlm.model import InternLM, InternLMConfig
from internlm.optim import BufferKey, HybridZeroOptimizer
from internlm.optim.flat_buffer import ALIGN, FlatBuffer, lane_order
from internlm.parallel.tp_shard import TPShard, declare_shards
from zero_utils import (
    HYPER,
    VOCAB,
    backward_step,
    make_opt,
    max_rel_error,
    reference_run,
    single_context,
    snapshot,
    tiny_model,
    train_zero,
    update_rel_error,
)


@pytest.mark.parametrize("overlap", [True, False])
def test_matches_torch_adamw_and_clip(overlap):
    ref, ref_norms = reference_run(steps=4)
    model = tiny_model()
    opt = make_opt(model, overlap_sync_grad=overlap, overlap_sync_param=overlap)
    assert len(opt.grad_reducer.buckets) > 2
    norms = train_zero(model, opt, range(4))
    assert max_rel_error(snapshot(model), ref) < 1e-6
    for a, b in zip(norms, ref_norms):
        assert abs(a - b) <= 1e-6 * b
    assert min(ref_norms) > HYPER["clip_grad_norm"]  # clipping was active on every step
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1 if b.key.decay else 0.0 for b in opt.buffers]


def test_buckets_launch_during_backward_only_with_overlap():
    for overlap in (True, False):
        model = tiny_model()
        opt = make_opt(model, overlap_sync_grad=overlap)
        opt.begin_step(2)
        backward_step(model, 0, 0, 1, micro_num=2)
        assert all(b.launched == overlap for b in opt.grad_reducer.buckets)
        assert all(p.grad is None for p in model.parameters())  # freed by the hook
        opt.step()


def test_too_many_micro_batches_raises():
    model = tiny_model()
    opt = make_opt(model)
    opt.begin_step(1)
    backward_step(model, 0, 0, 1, micro_num=1)
    with pytest.raises(RuntimeError, match="armed for 1 micro-batches"):
        backward_step(model, 0, 0, 1, micro_num=1)


def test_nonfinite_gradient_skips_step():
    model = tiny_model()
    before = snapshot(model)
    opt = make_opt(model)
    opt.begin_step(2)
    backward_step(model, 0, 0, 1, micro_num=2, loss_scale=float("nan"))
    norm, skipped = opt.step()
    assert skipped and math.isnan(norm) and opt.skipped_steps == 1 and opt.num_updates == 0
    assert max_rel_error(snapshot(model), before) == 0.0
    assert all(float(b.grads.abs().sum()) == 0.0 for b in opt.buffers)
    # the skipped step left no trace: training continues exactly like a fresh run
    train_zero(model, opt, range(3))
    ref, _ = reference_run(steps=3)
    assert max_rel_error(snapshot(model), ref) < 1e-6


def test_bf16_model_follows_fp32_with_fp32_master():
    ref, ref_norms = reference_run(steps=4)
    init = snapshot(tiny_model())
    model = tiny_model(torch.bfloat16)
    opt = make_opt(model)
    norms = train_zero(model, opt, range(4))
    assert all(m.dtype == torch.float32 for m in opt.masters)
    assert all(b.grads.dtype == torch.float32 for b in opt.buffers)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for buffer, master in zip(opt.buffers, opt.masters):  # params are the rounded masters
        assert torch.equal(buffer.param_shard(), master.to(torch.bfloat16))
    # bf16 rounding of weights and activations: measured 0.068 of the training displacement, 1e-3 on norms
    assert update_rel_error(snapshot(model), ref, init) < 0.15
    for a, b in zip(norms, ref_norms):
        assert abs(a - b) <= 1e-2 * b


def test_state_dict_round_trip_continues_identically():
    straight = tiny_model()
    train_zero(straight, make_opt(straight), range(4))

    model = tiny_model()
    opt = make_opt(model)
    train_zero(model, opt, range(2))
    opt.skipped_steps = 3  # counters travel too
    blob = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, blob)
    blob.seek(0)
    saved = torch.load(blob, weights_only=False)

    resumed = tiny_model()
    resumed.load_state_dict(saved["model"])
    opt2 = make_opt(resumed, lr=5.0)  # wrong lr on purpose: the shard restores it
    opt2.load_state_dict(saved["optim"])
    assert opt2.lr == HYPER["lr"] and opt2.num_updates == 2 and opt2.skipped_steps == 3
    train_zero(resumed, opt2, range(2, 4))
    assert max_rel_error(snapshot(resumed), snapshot(straight)) == 0.0


def test_close_then_fresh_optimizer_on_same_model():
    model = tiny_model()
    first = make_opt(model)
    train_zero(model, first, range(2))
    first.close()
    copy = tiny_model()
    copy.load_state_dict(model.state_dict())
    second = make_opt(model)  # fresh state on the same modules
    train_zero(model, second, range(2, 4))
    assert all(float(b.grads.abs().sum()) == 0.0 for b in first.buffers)  # old hooks are gone
    train_zero(copy, make_opt(copy), range(2, 4))
    assert max_rel_error(snapshot(model), snapshot(copy)) == 0.0


def test_state_dict_metadata_and_layout_errors():
    model = tiny_model()
    opt = make_opt(model)
    train_zero(model, opt, range(1))
    state = opt.state_dict()
    entries = {p["name"]: p for b in state["buffers"] for p in b["params"]}
    assert set(entries) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert entries["lm_head.weight"]["global_shape"] == [VOCAB, 32]
    for buffer in state["buffers"]:
        assert buffer["master"].numel() == buffer["shard_range"][1] - buffer["shard_range"][0]
        assert buffer["exp_avg"].dtype == torch.float32
    with pytest.raises(ValueError, match="zero1_size: saved 2 vs current 1"):
        opt.load_state_dict(dict(state, zero1_size=2))
    other = InternLM(
        InternLMConfig(
            hidden_size=32,
            num_layers=1,
            num_attention_heads=2,
            vocab_size=2 * VOCAB,
            multiple_of=16,
            attn_backend="sdpa",
        )
    )
    with pytest.raises(ValueError, match=r"parameter lm_head.weight: saved shape \[64, 32\]"):
        make_opt(other).load_state_dict(state)


def test_optim_state_bytes_and_hyper_parameters():
    model = tiny_model()
    opt = HybridZeroOptimizer(
        [model],
        single_context(),
        lr=3e-4,
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=0.01,
        clip_grad_norm=1.0,
        reduce_bucket_size=1024,
        overlap_sync_grad=False,
        overlap_sync_param=False,
    )
    assert opt.lr == 3e-4 and not opt.grad_reducer.overlap and opt.param_groups[0]["betas"] == (0.9, 0.95)
    opt.set_lr(1e-3)
    opt.set_beta2(0.99)
    assert opt.lr == 1e-3 and all(g["betas"] == (0.9, 0.99) for g in opt.param_groups)
    train_zero(model, opt, range(1))
    held = sum(
        t.numel() * t.element_size()
        for m in opt.masters
        for t in (m, opt.optimizer.state[m]["exp_avg"], opt.optimizer.state[m]["exp_avg_sq"])
    )
    assert opt.optim_state_bytes() == held
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 12 * num_params <= held < 12 * (num_params + 16 * len(opt.buffers))


def test_tp_shard_records_slices_and_joins():
    full = torch.arange(48.0).reshape(8, 6)
    pieces = []
    for rank in range(2):
        shard = TPShard.split((8, 6), dim=0, rank=rank, size=2)
        assert shard.is_split and not shard.duplicate and shard.local_shape == (4, 6)
        assert shard.to_record() == (0, rank, 2)
        assert TPShard.from_record((4, 6), shard.to_record()) == shard
        pieces.append(shard.slice(full))
        assert torch.equal(pieces[-1], full.chunk(2, 0)[rank])
    assert torch.equal(TPShard.split((8, 6), dim=0, rank=0, size=2).join(pieces), full)
    columns = [TPShard.split((8, 6), dim=1, rank=r, size=3).slice(full) for r in range(3)]
    assert torch.equal(TPShard.split((8, 6), dim=1, rank=2, size=3).join(columns), full)

    duplicate = TPShard.replicated((6,), rank=1, size=2, partial_grad=True)
    assert duplicate.duplicate and duplicate.partial_grad and not duplicate.is_split
    assert duplicate.to_record() is None and duplicate.local_shape == (6,)
    assert not TPShard.replicated((6,)).duplicate  # a tensor group of one holds no duplicate
    assert TPShard.from_record((6,), None) == TPShard.replicated((6,))
    assert torch.equal(duplicate.slice(full[0]), full[0]) and torch.equal(duplicate.join([full[0]]), full[0])
    with pytest.raises(ValueError, match="does not split into 4 tensor shards"):
        TPShard.split((6, 6), dim=0, rank=0, size=4)
    with pytest.raises(ValueError, match=r"expected a tensor of the full shape \[8, 6\]"):
        TPShard.split((8, 6), dim=0, rank=0, size=2).slice(full[:4])


def test_declared_shards_set_buffer_kinds_and_metadata():
    """Duplicate and partial-gradient parameters get their own buffers; the shard records its split."""
    model = torch.nn.Linear(6, 8)
    model.gain = torch.nn.Parameter(torch.ones(6))
    declare_shards(
        model,
        weight=TPShard.split((16, 6), dim=0, rank=1, size=2),
        bias=TPShard.replicated((8,), rank=1, size=2),
        gain=TPShard.replicated((6,), rank=1, size=2, partial_grad=True),
    )
    opt = make_opt(model, single_context(tp_rank=1, tp_size=2))
    kinds = {(b.key.decay, b.key.tp_duplicate, b.key.tp_partial_grad): [s.name for s in b.slots] for b in opt.buffers}
    assert kinds == {(True, False, False): ["weight"], (False, True, False): ["bias"], (False, True, True): ["gain"]}
    meta = {p["name"]: p for b in opt.state_dict()["buffers"] for p in b["params"]}
    assert (meta["weight"]["tp_shard"], meta["weight"]["global_shape"]) == ((0, 1, 2), [16, 6])
    assert (meta["gain"]["tp_shard"], meta["gain"]["global_shape"]) == (None, [6])
    opt.close()
    declare_shards(model, weight=TPShard.split((8, 6), dim=0, rank=1, size=2))
    with pytest.raises(ValueError, match=r"weight: declared tensor shard .* has local shape \[4, 6\]"):
        make_opt(model)


def test_step_never_reads_device_values(monkeypatch):
    """step() decides skip/clip on the device: no .item(), bool(), float(), int() or tolist() of a tensor."""
    model = tiny_model()
    opt = make_opt(model)
    for loss_scale in (1.0, float("nan")):
        opt.begin_step(2)
        backward_step(model, 0, 0, 1, micro_num=2, loss_scale=loss_scale)
        with monkeypatch.context() as patch:
            for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):

                def forbidden(*args, _name=name, **kwargs):
                    raise AssertionError(f"host sync in step(): Tensor.{_name}")

                patch.setattr(torch.Tensor, name, forbidden)
            norm, skipped = opt.step()
        assert torch.is_tensor(norm) and torch.is_tensor(skipped) and skipped.dtype == torch.bool
        assert bool(skipped) == (loss_scale != 1.0)
    assert (opt.num_updates, opt.skipped_steps) == (1, 1)
    assert int(opt.optimizer.state[opt.masters[0]]["step"]) == 1  # the fused kernel did not count the skip


def test_buckets_are_columns_of_the_slices_and_fill_in_backward_order():
    """Each bucket is the same column range of every zero1 slice; its block of the gradient storage holds those
    columns row by row; with lanes, buckets become ready in order during backward."""
    sizes = [130, 8, 200] + [24] * 30  # gradient-ready order: big early ones (an output head), then layers
    params = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
    entries = [(f"p{i}", p, TPShard.replicated((n,))) for i, (p, n) in enumerate(zip(params, sizes))]
    key = BufferKey(chunk=0, dtype=torch.float32, decay=False, tp_duplicate=False, tp_partial_grad=False)
    buffer = FlatBuffer(key, entries, zero1_size=4, zero1_rank=1, bucket_numel=4 * 32)
    z, s = 4, buffer.shard_numel
    assert all((c1 - c0) % ALIGN == 0 for c0, c1 in buffer.columns) and buffer.columns[-1][1] == s
    with torch.no_grad():
        buffer.params.copy_(torch.arange(buffer.padded_numel, dtype=torch.float32))
        for slot in buffer.slots:  # what the gradient hook does, with the parameter's own values as gradient
            flat = slot.param.detach().reshape(-1)
            for piece in buffer.grad_pieces(slot):
                buffer.grads[piece.dest : piece.dest + piece.hi - piece.lo] += flat[piece.lo : piece.hi]
    for b, (c0, c1) in enumerate(buffer.columns):
        rows = buffer.params.view(z, s)[:, c0:c1]
        rows = torch.where(rows < buffer.numel, rows, torch.zeros_like(rows))  # padding gets no gradient
        assert torch.equal(buffer.grad_block(b).view(z, c1 - c0), rows)
        assert torch.equal(buffer.param_shard_block(b), buffer.params[s + c0 : s + c1])
    # ready order: bucket b is ready when the last parameter touching it is final
    ready = [0] * len(buffer.columns)
    for slot in buffer.slots:
        index = int(slot.name[1:])
        for piece in buffer.grad_pieces(slot):
            ready[piece.bucket] = max(ready[piece.bucket], index)
    # measured [12, 16, 19, 23, 26, 28, 31, 32, 20] of 33 parameters: progressive, not all at the end of backward
    assert ready[:-1] == sorted(ready[:-1]) and ready[0] < len(sizes) // 2, ready
    order = lane_order(sizes, 4, s)
    assert sorted(order) == list(range(len(sizes)))


def test_grad_norm_matches_fp64_reference_at_16m_elements():

    from internlm.optim.grad_norm import global_grad_norm

    gen = torch.Generator().manual_seed(0)
    grads = (torch.randn(16 * 1024 * 1024, generator=gen) * 3e-3 + 1e-3).float()
    buffer = SimpleNamespace(grads=grads, key=SimpleNamespace(tp_duplicate=False), grad_shard=lambda: grads)
    got = float(global_grad_norm([buffer], None, None, None, tp_rank=0))
    want = float(grads.double().norm())
    assert abs(got - want) <= 1e-6 * want, (got, want)
    # the fp32 reduction this replaced is visibly off at this size
    naive = float(torch.linalg.vector_norm(grads))
    print(f"16M elements: fp64 partial sums {got:.9f}, fp64 reference {want:.9f}, fp32 vector_norm {naive:.9f}")
