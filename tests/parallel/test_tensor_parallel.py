"""Tensor / sequence parallel InternLM and vocab-parallel cross-entropy against the single-process model.

One 4-process gloo run computes every case (tp2, tp2+SP, tp4 with 2 kv heads (replicated k/v), tp4 with 2
kv heads + SP, the communication regions and the vocab-parallel loss); the tests assert on its results.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from distributed_utils import run_distributed
from internlm.labels import IGNORE_INDEX
from internlm.model import InternLM, InternLMConfig
from internlm.parallel import (
    ColumnParallelLinear,
    Layout,
    ParallelContext,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tensor_region,
    gather_from_sequence_region,
    init_parallel_context,
    make_loss_fn,
    parallelize_model,
    param_shards,
    reduce_from_tensor_region,
    reduce_scatter_to_sequence_region,
    scatter_to_sequence_region,
    vocab_parallel_cross_entropy,
)
from internlm.parallel.comm import all_gather_along_dim

WORLD = 4
SEQ = 32
CU_SEQLENS = torch.tensor([0, 13, SEQ], dtype=torch.int32)  # two packed documents
SMOOTHING = 0.1
CASES = {  # name: (tensor size, sequence parallel, kv heads)
    "tp2": (2, False, None),
    "tp2_sp": (2, True, None),
    "tp4_kv2": (4, False, 2),
    "tp4_kv2_sp": (4, True, 2),
}


def _config(kv_heads):
    return InternLMConfig.preset("internlm-tiny", num_layers=2, num_kv_attention_heads=kv_heads, dtype=torch.float32)


def _reference_model(kv_heads):
    """Tiny model with every parameter perturbed, so biases and norm weights are not trivially 0 / 1."""
    model = InternLM(_config(kv_heads))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _batch():
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 256, (1, SEQ), generator=gen)
    labels = torch.randint(0, 256, (1, SEQ), generator=gen)
    labels[0, CU_SEQLENS[1:] - 1] = IGNORE_INDEX  # last token of every document
    return ids, labels


def _full_grad(param, shard, pc):
    """The single-device gradient of ``param``: partial grads summed, shards gathered."""
    grad = param.grad.clone()
    if shard.partial_grad:
        torch.distributed.all_reduce(grad, group=pc.tp_group)
    if shard.is_split:
        grad = all_gather_along_dim(grad, shard.dim, pc.tp_group)
    return grad


def _model_case(rank, tp, sp, kv_heads):
    pc = init_parallel_context(Layout.create(WORLD, tensor=tp, sequence_parallel=sp), rank)
    ids, labels = _batch()
    ref = _reference_model(kv_heads)
    ref_logits = ref(ids, cu_seqlens=CU_SEQLENS)
    ref_loss = make_loss_fn(ParallelContext.single(), SMOOTHING)(ref_logits, labels)
    ref_loss.backward()

    par = parallelize_model(copy.deepcopy(ref), pc)
    local_logits = par(ids, cu_seqlens=CU_SEQLENS)
    loss = make_loss_fn(pc, SMOOTHING)(local_logits, labels)
    loss.backward()

    logits = all_gather_along_dim(local_logits.detach(), -1, pc.tp_group)
    ref_grads = dict(ref.named_parameters())
    shards = param_shards(par)
    grad_abs, grad_rel, worst = 0.0, 0.0, ""
    for name, param in par.named_parameters():
        expected = ref_grads[name].grad
        err = (_full_grad(param, shards[name], pc) - expected).abs().max().item()
        if err > grad_abs:
            grad_abs, worst = err, name
        grad_rel = max(grad_rel, err / expected.abs().max().item())
    hidden = par.embed_tokens(ids)
    return dict(
        logits_abs=(logits - ref_logits.detach()).abs().max().item(),
        logits_rel=((logits - ref_logits.detach()).abs().max() / ref_logits.abs().max()).item(),
        loss_abs=abs(loss.item() - ref_loss.item()),
        grad_abs=grad_abs,
        grad_rel=grad_rel,
        worst=worst,
        n_params=len(list(par.parameters())),
        hidden_seq=hidden.shape[1],
        local_vocab=local_logits.shape[-1],
        marks={n: (s.to_record(), s.duplicate, s.partial_grad) for n, s in shards.items()},
    )


def _meta_case(rank, tp, kv_heads):
    """A meta-built, parallelized, then initialised model equals a materialised model sliced afterwards."""
    pc = init_parallel_context(Layout.create(WORLD, tensor=tp), rank)
    with torch.device("meta"):
        meta = InternLM(_config(kv_heads))
    meta = parallelize_model(meta, pc)
    meta.to_empty(device="cpu")
    meta.init_weights(seed=3, shards=param_shards(meta))
    full = InternLM(_config(kv_heads))
    full.init_weights(seed=3)
    sliced = parallelize_model(full, pc)
    sliced_params = dict(sliced.named_parameters())
    diff = 0.0
    for name, p in meta.named_parameters():
        q = sliced_params[name]
        diff = max(diff, (p - q).abs().max().item()) if p.shape == q.shape else float("inf")
    marks_equal = param_shards(meta) == param_shards(sliced)
    return dict(diff=diff, marks_equal=marks_equal, n=len(sliced_params))


def _regions_case(rank):
    """Forward and backward of every region on a (1, 4, 3) tensor over the 4-rank tensor group."""
    pc = init_parallel_context(Layout.create(WORLD, tensor=WORLD), rank)
    g = pc.tp_group
    full = torch.arange(12.0).reshape(1, 4, 3)
    weight = torch.arange(12.0).reshape(1, 4, 3) + 100 * rank  # rank-dependent upstream gradient
    out = {}
    x = full.clone().requires_grad_()
    (copy_to_tensor_region(x, g) * weight).sum().backward()
    out["copy"] = x.grad
    x = (full + rank).requires_grad_()
    y = reduce_from_tensor_region(x, g)
    (y * weight).sum().backward()
    out["reduce"] = (y.detach(), x.grad)
    x = full.clone().requires_grad_()
    y = scatter_to_sequence_region(x, g)
    (y * weight[:, rank : rank + 1]).sum().backward()
    out["scatter"] = (y.detach(), x.grad)
    x = full[:, rank : rank + 1].clone().requires_grad_()
    y = gather_from_sequence_region(x, g)
    (y * weight).sum().backward()
    out["gather"] = (y.detach(), x.grad)
    x = (full + rank).requires_grad_()
    y = reduce_scatter_to_sequence_region(x, g)
    (y * weight[:, rank : rank + 1]).sum().backward()
    out["reduce_scatter"] = (y.detach(), x.grad)
    return out


def _cross_entropy_case(rank, tp):
    pc = init_parallel_context(Layout.create(WORLD, tensor=tp), rank)
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(20, 256, generator=gen) * 3
    labels = torch.randint(0, 256, (20,), generator=gen)
    labels[[3, 7, 15]] = IGNORE_INDEX
    upstream = torch.rand(20, generator=gen)  # a non-uniform gradient of the per-token loss
    out = {}
    for eps in (0.0, SMOOTHING):
        full = logits.clone().requires_grad_()
        expected = F.cross_entropy(full, labels, reduction="none", label_smoothing=eps)
        (expected * upstream).sum().backward()
        local = logits.chunk(tp, dim=-1)[pc.tp_rank].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(local, labels, pc.tp_group, label_smoothing=eps)
        (loss * upstream).sum().backward()
        out[eps] = dict(
            loss_abs=(loss - expected.detach()).abs().max().item(),
            grad_abs=(local.grad - full.grad.chunk(tp, dim=-1)[pc.tp_rank]).abs().max().item(),
            ignored_zero=bool((loss[[3, 7, 15]] == 0).all()) and bool((local.grad[[3, 7, 15]] == 0).all()),
        )
    return out


def _stage_case(rank):
    """Pipeline stages under tp2 + SP: [embedding, layer 0] emits sequence-sharded hidden states and
    [layer 1, norm, lm_head] consumes them; both match the single-process model."""
    pc = init_parallel_context(Layout.create(WORLD, tensor=2, sequence_parallel=True), rank)
    ids, _ = _batch()
    ref = _reference_model(None)
    positions = torch.cat([torch.arange(13), torch.arange(SEQ - 13)])
    with torch.no_grad():
        hidden = ref.layers["0"](ref.embed_tokens(ids), CU_SEQLENS, positions)
        ref_logits = ref(ids, cu_seqlens=CU_SEQLENS)
    first, last = copy.deepcopy(ref), copy.deepcopy(ref)
    first.norm = first.lm_head = None
    del first.layers["1"]
    last.embed_tokens = None
    del last.layers["0"]
    first, last = parallelize_model(first, pc), parallelize_model(last, pc)
    with torch.no_grad():
        sent = first(ids, cu_seqlens=CU_SEQLENS)  # (1, S/2, H): this rank's sequence chunk
        logits = last(sent, cu_seqlens=CU_SEQLENS)
    g = pc.tp_group
    shapes = [
        tuple(layer.weight.shape)
        for layer in (
            ColumnParallelLinear(64, 32, True, g),
            RowParallelLinear(32, 64, True, g),
            VocabParallelEmbedding(256, 64, g),
        )
    ]
    return dict(
        sent_shape=tuple(sent.shape),
        hidden_abs=(all_gather_along_dim(sent, 1, g) - hidden).abs().max().item(),
        logits_abs=(all_gather_along_dim(logits, -1, g) - ref_logits).abs().max().item(),
        standalone_shapes=shapes,
    )


def _worker(rank, world_size):
    assert world_size == WORLD
    return dict(
        models={name: _model_case(rank, *case) for name, case in CASES.items()},
        meta={"tp2": _meta_case(rank, 2, None), "tp4_kv2": _meta_case(rank, 4, 2)},
        regions=_regions_case(rank),
        cross_entropy={tp: _cross_entropy_case(rank, tp) for tp in (2, 4)},
        stages=_stage_case(rank),
    )


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, WORLD)


@pytest.mark.parametrize("case", list(CASES))
def test_model_matches_single_process(results, case):
    tp, sp, _ = CASES[case]
    for rank, res in enumerate(r["models"][case] for r in results):
        assert res["logits_abs"] < 1e-5, (rank, res["logits_abs"])
        assert res["loss_abs"] < 1e-4, (rank, res["loss_abs"])  # a sum over 30 tokens of ~5.5 each
        assert res["grad_abs"] < 1e-5, (rank, res["worst"], res["grad_abs"])
        assert res["local_vocab"] == 256 // tp
        assert res["hidden_seq"] == (SEQ // tp if sp else SEQ)  # SP: the embedding output is sequence-sharded


@pytest.mark.parametrize("case", list(CASES))
def test_parameter_marks(results, case):
    tp, sp, kv_heads = CASES[case]
    for rank, res in enumerate(r["models"][case] for r in results):
        marks = res["marks"]
        assert marks["layers.0.self_attn.q_proj.weight"] == ((0, rank % tp, tp), False, False)
        assert marks["layers.1.self_attn.o_proj.weight"] == ((1, rank % tp, tp), False, False)
        assert marks["layers.1.self_attn.o_proj.bias"] == (None, True, sp)
        assert marks["layers.0.mlp.down_proj.weight"] == ((1, rank % tp, tp), False, False)
        assert marks["embed_tokens.weight"] == ((0, rank % tp, tp), False, False)
        assert marks["lm_head.weight"] == ((0, rank % tp, tp), False, False)
        assert marks["norm.weight"] == (None, True, sp)
        assert marks["layers.0.input_layernorm.weight"] == (None, True, sp)
        replicated_kv = kv_heads is not None and kv_heads % tp != 0
        expected_kv = (None, True, True) if replicated_kv else ((0, rank % tp, tp), False, False)
        assert marks["layers.0.self_attn.k_proj.weight"] == expected_kv
        assert marks["layers.1.self_attn.v_proj.bias"] == expected_kv


@pytest.mark.parametrize("case", ["tp2", "tp4_kv2"])
def test_meta_init_equals_sliced_weights(results, case):
    for res in (r["meta"][case] for r in results):
        assert res["diff"] == 0.0 and res["marks_equal"] and res["n"] > 0


def test_pipeline_stages_with_sequence_parallel(results):
    for res in (r["stages"] for r in results):
        assert res["sent_shape"] == (1, SEQ // 2, 64)
        assert res["hidden_abs"] < 1e-6 and res["logits_abs"] < 1e-5, res
        assert res["standalone_shapes"] == [(16, 64), (64, 16), (128, 64)]


def test_regions_forward_and_backward(results):
    full = torch.arange(12.0).reshape(1, 4, 3)
    weight_sum = sum(full + 100 * r for r in range(WORLD))  # sum over ranks of the upstream gradients
    for rank, res in enumerate(r["regions"] for r in results):
        weight = full + 100 * rank
        torch.testing.assert_close(res["copy"], weight_sum)  # bwd all-reduce
        y, grad = res["reduce"]
        torch.testing.assert_close(y, WORLD * full + sum(range(WORLD)))  # fwd all-reduce
        torch.testing.assert_close(grad, weight)  # bwd identity
        y, grad = res["scatter"]
        torch.testing.assert_close(y, full[:, rank : rank + 1])
        torch.testing.assert_close(grad, torch.cat([full[:, r : r + 1] + 100 * r for r in range(WORLD)], dim=1))
        y, grad = res["gather"]
        torch.testing.assert_close(y, full)
        torch.testing.assert_close(grad, weight_sum[:, rank : rank + 1])  # bwd reduce-scatter
        y, grad = res["reduce_scatter"]
        torch.testing.assert_close(y, (WORLD * full + sum(range(WORLD)))[:, rank : rank + 1])
        torch.testing.assert_close(grad, torch.cat([full[:, r : r + 1] + 100 * r for r in range(WORLD)], dim=1))


@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_cross_entropy(results, tp):
    for res in (r["cross_entropy"][tp] for r in results):
        for eps in (0.0, SMOOTHING):
            assert res[eps]["loss_abs"] < 1e-5 and res[eps]["grad_abs"] < 1e-6, (eps, res[eps])
            assert res[eps]["ignored_zero"]


def test_single_process_loss_and_no_group_cross_entropy():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 9, 32, generator=gen, requires_grad=True)
    labels = torch.randint(0, 32, (2, 9), generator=gen)
    labels[0, 4] = IGNORE_INDEX
    for eps in (0.0, 0.2):
        got = make_loss_fn(ParallelContext.single(), eps)(logits, labels)
        want = F.cross_entropy(logits.reshape(-1, 32), labels.reshape(-1), reduction="sum", label_smoothing=eps)
        assert got.dtype == torch.float32 and abs(got.item() - want.item()) < 1e-5
        (g1,) = torch.autograd.grad(vocab_parallel_cross_entropy(logits, labels, None, eps).sum(), logits)
        (g2,) = torch.autograd.grad(want, logits)
        torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)


def test_tp1_parallelize_is_identity():
    model = InternLM(_config(None))
    assert parallelize_model(model, ParallelContext.single()) is model
    assert all(not shard.is_split and not shard.duplicate for shard in param_shards(model).values())
