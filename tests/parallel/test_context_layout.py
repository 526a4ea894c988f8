"""The context dimension of the Layout: rank formula, groups, checks, records; and the planner's context terms."""

import pytest

from internlm.model import InternLMConfig
from internlm.parallel import Layout, ParallelContext, describe_groups
from internlm.planning import stage_memory, step_communication
from internlm.planning.communication import context_layer_bytes

TINY = InternLMConfig.preset("internlm-tiny")  # hidden 64, 4 heads, vocab 256


def test_rank_formula_puts_context_next_to_tensor():
    layout = Layout.create(16, tensor=2, pipeline=2, zero1=1, context=2)
    assert (layout.data, layout.context) == (2, 2)
    for rank in range(16):
        tp, dp, pp = layout.coords(rank)
        cp = layout.cp_rank(rank)
        assert rank == tp + 2 * (cp + 2 * (dp + 2 * pp)) == layout.rank_of(tp, dp, pp, cp)
    groups = layout.group_ranks()
    assert groups["cp"][:3] == [[0, 2], [1, 3], [4, 6]]  # inside a block of tensor x context = 4 ranks
    assert groups["dp"][0] == [0, 4] and groups["pp"][0] == [0, 8] and groups["tp"][1] == [2, 3]
    # the optimizer's replica group sums the gradients of data and context ranks holding the same slice
    assert groups["zero1_replica"][0] == [0, 2, 4, 6]
    for kind in ("tp", "dp", "pp", "cp", "zero1", "zero1_replica"):
        ranks = sorted(r for group in groups[kind] for r in group)
        assert ranks == list(range(16)), kind
    hybrid = Layout.create(8, context=2, zero1=2).group_ranks()  # data 4: two zero1 blocks per context rank
    assert hybrid["zero1"] == [[0, 2], [4, 6], [1, 3], [5, 7]]
    assert hybrid["zero1_replica"] == [[0, 1, 4, 5], [2, 3, 6, 7]]


def test_without_context_the_groups_and_text_are_unchanged():
    layout = Layout.create(8, tensor=2, pipeline=2, zero1=1)
    assert "cp" not in layout.group_ranks() and layout.describe() == "tp2 x pp2 x dp2 (zero1 1, 1 chunk, 8 ranks)"
    cp = Layout.create(8, tensor=2, context=4)
    assert cp.describe() == "tp2 x cp4-ring x pp1 x dp1 (zero1 1, 1 chunk, 8 ranks)"
    assert "context 4 (ring)" in cp.describe("sentence") and "cp4-ring" in cp.describe("compact")
    pc = ParallelContext(layout=cp)
    assert pc.cp_size == 4 and pc.zero1_replicas == 4 and "cp " in describe_groups(pc)


def test_records_without_context_still_load():
    old = {k: v for k, v in Layout.create(4, tensor=2).to_dict().items() if not k.startswith("context")}
    assert Layout.from_dict(old) == Layout.create(4, tensor=2)
    layout = Layout.create(8, context=4, context_mode="a2a")
    assert Layout.from_dict(layout.to_dict()) == layout


def _fit(world, seq_len=32, micro_bsz=1, model=TINY, **sizes):
    return [str(p) for p in Layout.create(world, **sizes).fit_problems(model, micro_bsz, seq_len, micro_num=4)]


def test_context_problems_name_the_keys():
    assert _fit(8, tensor=2, context=4, seq_len=64, sequence_parallel=True) == []
    assert _fit(6, context=4) == [
        "parallel.tensor / parallel.pipeline.size / parallel.context: world size 6 is not a multiple of tensor (1) "
        "* pipeline (1) * context (4)"
    ]
    (ring,) = _fit(4, context=4, seq_len=36)  # zigzag: 2C = 8 chunks
    assert ring.startswith("data.seq_len / parallel.context: 36 is not divisible by 8")
    assert _fit(4, context=4, seq_len=36, context_mode="a2a") == []  # a2a: C = 4 chunks
    (heads,) = _fit(8, tensor=2, context=4, context_mode="a2a")  # 2 query heads per tensor rank, context 4
    assert heads.startswith("parallel.context / parallel.context_mode / model.num_attention_heads: 2 query heads")
    (sp,) = _fit(8, tensor=4, context=2, seq_len=12, micro_bsz=1, sequence_parallel=True)
    assert sp.startswith("parallel.sequence_parallel: micro_bsz * seq_len / parallel.context 2 = 1 * 12")
    (mode,) = Layout.create(2, context=2, context_mode="ulysses").problems()
    assert mode.key == "parallel.context_mode"


def test_planner_divides_activations_and_counts_context_bytes():
    mc = InternLMConfig.preset("internlm-7b", dtype="bf16")
    one = stage_memory(mc, Layout.create(8, tensor=2, context=1), 1, 32768, 4)
    four = stage_memory(mc, Layout.create(8, tensor=2, context=4, context_mode="a2a"), 1, 32768, 4)
    quarter = stage_memory(mc, Layout.create(8, tensor=2, context=1), 1, 32768 // 4, 4)
    for key in ("activations", "transient"):  # a rank's activations: those of N / C tokens
        assert four.as_dict()[key] == pytest.approx(quarter.as_dict()[key])
    assert four.as_dict()["activations"] < one.as_dict()["activations"] / 3.9
    ring = stage_memory(mc, Layout.create(8, tensor=2, context=4), 1, 32768, 4).as_dict()
    blocks = 4 * 4 * 16 * 4096**2  # four fp32 (heads, c, c) score blocks, c = 32768 / 8 tokens of a zigzag chunk
    assert blocks < ring["transient"] < blocks + 2 * quarter.as_dict()["transient"]
    n, kv, d, b = 32768 / 4, 32 // 2, 128, 2  # tokens per context rank, kv heads per tensor rank, head dim, bf16
    ring = Layout.create(8, tensor=2, context=4)
    forward, backward, again = context_layer_bytes(mc, ring, 32768)
    assert (forward, backward, again) == (3 * 2 * n * kv * d * b, forward + 4 * 2 * n * kv * d * 4, forward)
    assert step_communication(mc, ring, 1, 32768, 4).context == 4 * 32 * (forward + backward)  # micro_num x layers
    recomputed = step_communication(mc, ring, 1, 32768, 4, checkpoint=True).context
    assert recomputed == 4 * 32 * (2 * forward + backward)  # every layer's forward runs again
    a2a = Layout.create(8, tensor=2, context=4, context_mode="a2a")
    qkv, out = 3 / 4 * n * d * b * (16 + 2 * 16), 3 / 4 * n * d * b * 16
    assert context_layer_bytes(mc, a2a, 32768) == (qkv + out, qkv + out, qkv)
    attn = step_communication(mc, a2a, 1, 32768, 4, checkpoint="attn").context
    assert attn == 4 * 32 * (2 * (qkv + out) + qkv)  # the recomputed core resends only q, k, v
    assert step_communication(mc, Layout.create(8, tensor=2), 1, 32768, 4).context == 0
