"""Context-parallel attention (internlm.parallel.context) against one process.

One 4-process gloo run computes every distributed case: ring over 4 ranks, ring and a2a over the context groups
{0, 2} and {1, 3} (size 2, non-adjacent global ranks), a2a over 4 ranks (2 kv heads replicated to 4). Each case's
output and dq, dk, dv, gathered back to global order, must equal one process's reference attention within 1e-5
(GQA 4 query / 2 kv heads, fp64, packed documents crossing shard boundaries, one longer than a shard). The rest are
single-process checks of the token layouts, the `ContextShard` facts and the block arithmetic.
"""

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from distributed_utils import run_distributed
from internlm.model.attention import PackedDocs, packed_causal_attention, positions_from_cu_seqlens
from internlm.parallel.context import (
    ContextAttentionCore,
    ContextShard,
    context_attention,
    context_attention_bytes,
    contiguous_index,
    restore_order,
    shard_index,
    zigzag_index,
)
from internlm.parallel.context.block import (
    block_backward,
    block_forward,
    fused_available,
    merge_,
    piece_backward,
    piece_forward,
)

WORLD = 4
TOTAL = 48
# documents of 5, 7, 26, 1, 9 tokens: boundaries inside shards, and 26 tokens > a shard of 24 (size 2) or 12 (size 4)
BOUNDS = [0, 5, 12, 38, 39, TOTAL]
HQ, HKV, DIM = 4, 2, 8
# fp64: absolute (the 1e-5); bf16: relative to the largest value, 2.5 units in the last place (2^-8)
TOL = {torch.float64: 1e-5, torch.bfloat16: 1e-2}
CASES = {  # name: (mode, context groups (global ranks), dtype, backend, through the module under checkpointing)
    "ring4": ("ring", [[0, 1, 2, 3]], torch.float64, "reference", False),  # explicit masked blocks
    "ring4_fused": ("ring", [[0, 1, 2, 3]], torch.float64, "sdpa", False),  # fused kernel per document piece
    "ring2": ("ring", [[0, 2], [1, 3]], torch.float64, "sdpa", True),
    "a2a2": ("a2a", [[0, 2], [1, 3]], torch.float64, "sdpa", True),
    "a2a4_kv_replicated": ("a2a", [[0, 1, 2, 3]], torch.float64, "reference", False),
    "ring4_bf16": ("ring", [[0, 1, 2, 3]], torch.bfloat16, "sdpa", False),
}


def _docs(bounds=BOUNDS):
    return PackedDocs(torch.tensor(bounds, dtype=torch.int32), bounds=bounds)


def _inputs(dtype):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(TOTAL, h, DIM, generator=gen, dtype=torch.float64).to(dtype) for h in (HQ, HKV, HKV, HQ)]


def _reference(dtype):
    q, k, v, dout = (t.clone().requires_grad_(i < 3) for i, t in enumerate(_inputs(dtype)))
    out = packed_causal_attention(q, k, v, _docs(), backend="reference")
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


class _SentBytes:
    """Counts the bytes this rank sends by ring point-to-point (`batch_isend_irecv`) and all-to-all ((g-1)/g of the
    input) while active."""

    def __init__(self):
        self.sent = 0.0
        self.originals = {}

    def __enter__(self):
        self.originals = {name: getattr(dist, name) for name in ("batch_isend_irecv", "all_to_all_single")}

        def p2p(ops):
            self.sent += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
            return self.originals["batch_isend_irecv"](ops)

        def all_to_all(out, x, group=None, **kwargs):
            size = dist.get_world_size(group)
            self.sent += (size - 1) / size * x.numel() * x.element_size()
            return self.originals["all_to_all_single"](out, x, group=group, **kwargs)

        dist.batch_isend_irecv, dist.all_to_all_single = p2p, all_to_all
        return self

    def __exit__(self, *exc):
        for name, fn in self.originals.items():
            setattr(dist, name, fn)


def _worker(rank, world_size):
    results = {}
    for name, (mode, groups, dtype, backend, as_module) in CASES.items():
        handles = [dist.new_group(g) for g in groups]  # every rank creates every group, in the same order
        group = next(h for g, h in zip(groups, handles) if rank in g)
        shard = ContextShard.build(_docs(), group, mode)
        q, k, v, dout = (shard.take(t) for t in _inputs(dtype))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        with _SentBytes() as forward:
            if as_module:  # recomputed in the backward, as model.checkpoint recomputes the attention core
                core = ContextAttentionCore(group)
                out = checkpoint(core, q, k, v, shard, backend, use_reentrant=False)
            else:
                out = context_attention(q, k, v, shard, group, backend=backend)
        with _SentBytes() as backward:
            out.backward(dout)
        tensors = [t.detach() for t in (out, q.grad, k.grad, v.grad)]
        results[name] = (shard.rank, tensors, (forward.sent, backward.sent))
    return results


@pytest.fixture(scope="module")
def distributed():
    return run_distributed(_worker, WORLD)


@pytest.mark.parametrize("name", list(CASES))
def test_context_attention_equals_one_process(distributed, name):
    mode, groups, dtype, _, _ = CASES[name]
    expected = _reference(dtype)
    for group in groups:
        by_rank = sorted((distributed[r][name] for r in group), key=lambda result: result[0])  # context rank order
        for what, ref, i in zip(("out", "dq", "dk", "dv"), expected, range(4)):
            got = restore_order(torch.cat([tensors[i] for _, tensors, _ in by_rank]), mode, len(group))
            diff = (got.double() - ref.double()).abs().max().item()
            print(f"{name} group {group} {what}: max abs diff {diff:.2e}")
            if dtype == torch.bfloat16:
                diff /= ref.double().abs().max().item()
            assert diff < TOL[dtype], f"{name} {what} differs from one process by {diff}"


@pytest.mark.parametrize("name", list(CASES))
def test_sent_bytes_match_formulas(distributed, name):
    """The bytes every rank sent equal `context_attention_bytes` (the planner's formulas), with the recomputation's
    bytes in the backward of the checkpointed cases."""
    mode, groups, dtype, _, recomputed = CASES[name]
    size = len(groups[0])
    expected = context_attention_bytes(mode, TOTAL // size, size, HQ, HKV, DIM, torch.finfo(dtype).bits // 8)
    backward = expected.backward + (expected.recompute if recomputed else 0.0)
    for rank in range(WORLD):
        assert distributed[rank][name][2] == (expected.forward, backward), (rank, distributed[rank][name][2])


def test_indices():
    assert zigzag_index(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert zigzag_index(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert zigzag_index(16, 4, 1).tolist() == [2, 3, 12, 13]
    assert contiguous_index(16, 4, 1).tolist() == [4, 5, 6, 7]
    for mode in ("ring", "a2a"):
        for size in (1, 2, 4):
            index = torch.cat([shard_index(mode, 48, size, r) for r in range(size)])
            assert sorted(index.tolist()) == list(range(48))
            x = torch.arange(48.0)
            assert torch.equal(restore_order(x[index], mode, size), x)
    with pytest.raises(ValueError, match="parallel.context=4"):
        zigzag_index(20, 4, 0)
    with pytest.raises(ValueError, match="context_mode"):
        shard_index("ulysses", 16, 2, 0)


def test_shard_positions():
    docs = _docs()
    global_pos = positions_from_cu_seqlens(docs.cu_seqlens, TOTAL)
    for mode in ("ring", "a2a"):
        for size in (2, 4):
            for rank in range(size):
                shard = ContextShard.build(docs, None, mode, size=size, rank=rank)
                assert torch.equal(shard.index, shard_index(mode, TOTAL, size, rank))
                assert torch.equal(shard.position_ids, global_pos[shard.index])
                assert shard.max_seqlen == 26 and shard.local_tokens == TOTAL // size


def _visible_pairs(bounds, size, q_rank, k_rank, mode="ring"):
    """(visible pairs by the global mask, pairs inside the shard's rectangles, visible pairs inside them)."""
    shard = ContextShard.build(_docs(bounds), None, mode, size=size, rank=q_rank)
    doc = np.searchsorted(bounds, np.arange(bounds[-1]), side="right") - 1
    qi, ki = shard.peer_positions(q_rank).numpy(), shard.peer_positions(k_rank).numpy()
    mask = (doc[qi][:, None] == doc[ki][None, :]) & (ki[None, :] <= qi[:, None])
    covered = np.zeros_like(mask)
    area = 0
    for pair in shard.block_pairs(q_rank, k_rank):
        covered[pair.q, pair.k] = True
        area += (pair.q.stop - pair.q.start) * (pair.k.stop - pair.k.start)
        sub = shard.visible(q_rank, k_rank, pair).numpy()
        assert np.array_equal(sub, mask[pair.q, pair.k])
        assert not pair.full or sub.all()
    assert not (mask & ~covered).any(), "a visible pair outside every computed rectangle"
    pieces = np.zeros(mask.shape, dtype=np.int64)  # how many pieces hold each pair
    for piece in shard.pieces(q_rank, k_rank):
        rows, cols = piece.q.stop - piece.q.start, piece.k.stop - piece.k.start
        pattern = np.tril(np.ones((rows, cols), dtype=bool)) if piece.causal else np.ones((rows, cols), dtype=bool)
        assert np.array_equal(mask[piece.q, piece.k] & pattern, pattern), "a piece holds a masked pair"
        pieces[piece.q, piece.k] += pattern
    assert np.array_equal(pieces, mask.astype(np.int64)), "the pieces do not hold every visible pair exactly once"
    return int(mask.sum()), area


@pytest.mark.parametrize("bounds", [BOUNDS, [0, 3, 4, 20, 21, 47, TOTAL], [0, TOTAL]])
def test_rectangles_and_pieces_cover_every_visible_pair(bounds):
    for mode in ("ring", "a2a"):
        for size in (2, 4):
            for q_rank in range(size):
                for k_rank in range(size):
                    _visible_pairs(bounds, size, q_rank, k_rank, mode)


def test_zigzag_balance_one_document():
    """One document: every rank computes the same area at every ring step: 3 of its 4 chunk pairs on the diagonal
    (its first chunk does not see its second), half a block off it."""
    size, local = 4, TOTAL // 4
    for step in range(size):
        areas = {_visible_pairs([0, TOTAL], size, r, (r - step) % size)[1] for r in range(size)}
        assert areas == ({local * local * 3 // 4} if step == 0 else {local * local // 2}), (step, areas)
    work = {sum(_visible_pairs([0, TOTAL], size, r, k)[0] for k in range(size)) for r in range(size)}
    assert len(work) == 1


def test_block_merge_and_masked_rows():
    """Two blocks merged by the online softmax equal one softmax over both; a fully masked row gives 0, no NaN."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(5, h, DIM, generator=gen, dtype=torch.float64) for h in (HQ, HKV, HKV))
    visible = torch.ones(5, 5, dtype=torch.bool).tril()
    visible[0] = False  # row 0 sees nothing in this block
    full, full_lse = block_forward(q, k, v, visible, 0.5)
    assert torch.isfinite(full).all() and (full[0] == 0).all() and torch.isinf(full_lse[0]).all()
    first, first_lse = block_forward(q, k[:2], v[:2], visible[:, :2], 0.5)
    second, second_lse = block_forward(q, k[2:], v[2:], visible[:, 2:], 0.5)
    merge_(first, first_lse, second, second_lse)
    assert torch.allclose(first, full) and torch.allclose(first_lse, full_lse)


@pytest.mark.parametrize("causal", [True, False])
def test_fused_piece_equals_explicit_block(causal):
    """The fused CPU kernel of a document piece (the ring's path for every backend but "reference") gives the
    explicit block's output, lse and gradients, GQA included."""
    assert fused_available(torch.device("cpu"))
    gen = torch.Generator().manual_seed(4)
    q, k, v, dout = (torch.randn(6, h, DIM, generator=gen, dtype=torch.float64) for h in (HQ, HKV, HKV, HQ))
    visible = torch.ones(6, 6, dtype=torch.bool).tril() if causal else None
    out, lse = piece_forward(q, k, v, causal, 0.3)
    ref_out, ref_lse = block_forward(q, k, v, visible, 0.3)
    assert torch.allclose(out, ref_out) and torch.allclose(lse, ref_lse)
    delta = (dout * ref_out).sum(-1)
    got = piece_backward(q, k, v, dout, out, lse, causal, 0.3)
    for g, r in zip(got, block_backward(q, k, v, dout, ref_lse, delta, visible, 0.3)):
        assert g.shape == r.shape and torch.allclose(g, r)
