"""Process-group grid, config parsing and tensor-layout checks."""

import pytest
import torch
import torch.distributed as dist

from distributed_utils import run_distributed
from internlm.model import InternLMConfig
from internlm.parallel import (
    ParallelContext,
    describe_layout,
    group_ranks,
    init_parallel_context,
    parse_parallel_sizes,
    tensor_layout_problems,
)


def test_group_ranks_world8_tp2_pp2():
    groups = group_ranks(8, tp=2, pp=2, zero1=1)
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert groups["zero1"] == [[0], [2], [1], [3], [4], [6], [5], [7]]
    assert group_ranks(8, tp=2, pp=2, zero1=2)["zero1"] == groups["dp"]


def test_zero1_subgroups_are_consecutive_dp_blocks():
    groups = group_ranks(16, tp=2, pp=1, zero1=4)  # dp = 8
    assert groups["dp"][0] == [0, 2, 4, 6, 8, 10, 12, 14]
    assert groups["zero1"] == [[0, 2, 4, 6], [8, 10, 12, 14], [1, 3, 5, 7], [9, 11, 13, 15]]


def test_parse_sizes_shorthand_and_errors():
    cfg = dict(tensor=2, pipeline=dict(size=2, interleaved_overlap=True), zero1=dict(size=-1))
    sizes = parse_parallel_sizes(cfg, 8)
    assert (sizes["tp"], sizes["pp"], sizes["dp"], sizes["zero1"]) == (2, 2, 2, 2)
    assert parse_parallel_sizes(dict(tensor=dict(size=1), zero1=0), 4)["zero1"] == 4
    assert parse_parallel_sizes(dict(zero1=2, sequence_parallel=True), 8)["sequence_parallel"] is True
    with pytest.raises(ValueError, match=r"parallel: world size 6 is not a multiple of tensor \(4\) \* pipeline \(1\)"):
        parse_parallel_sizes(dict(tensor=4), 6)
    with pytest.raises(ValueError, match=r"parallel.zero1: size 3 does not divide the data-parallel size 4"):
        parse_parallel_sizes(dict(tensor=2, zero1=3), 8)


def test_single_and_describe():
    pc = ParallelContext.single()
    assert (pc.tp_size, pc.pp_size, pc.dp_size, pc.zero1_size) == (1, 1, 1, 1)
    assert pc.tp_group is None and pc.is_first_stage and pc.is_last_stage
    assert init_parallel_context(dict(tensor=1), 1, 0) == ParallelContext.single()
    big = ParallelContext(world_size=8, tp_size=2, pp_size=2, dp_size=2, zero1_size=2)
    text = describe_layout(big)
    assert "world 8 = tensor 2 x data 2 x pipeline 2" in text
    assert "tp    groups (4): [0,1] [2,3] [4,5] [6,7]" in text
    assert "pp    groups (4): [0,4] [1,5] [2,6] [3,7]" in text
    assert "zero1 groups (4): [0,2] [1,3] [4,6] [5,7]" in text


def _grid_worker(rank, world_size, configs):
    out = []
    for cfg in configs:
        pc = init_parallel_context(cfg, world_size, rank)
        sums = {}
        for kind in ("tp", "dp", "pp", "zero1"):
            t = torch.tensor([float(rank)])
            dist.all_reduce(t, group=getattr(pc, f"{kind}_group"))
            sums[kind] = int(t.item())
        fields = {k: getattr(pc, k) for k in ("tp_rank", "dp_rank", "pp_rank", "zero1_rank", "tp_size", "dp_size",
                                              "pp_size", "zero1_size", "pp_prev_rank", "pp_next_rank")}
        out.append(dict(fields, sums=sums, first=pc.is_first_stage, last=pc.is_last_stage))
    return out


def _check_grid(world, configs, results):
    for i, cfg in enumerate(configs):
        sizes = parse_parallel_sizes(cfg, world)
        tp, pp, dp, zero1 = sizes["tp"], sizes["pp"], sizes["dp"], sizes["zero1"]
        groups = group_ranks(world, tp, pp, zero1)
        for rank in range(world):
            res = results[rank][i]
            tp_rank, dp_rank, pp_rank = rank % tp, (rank // tp) % dp, rank // (tp * dp)
            assert (res["tp_rank"], res["dp_rank"], res["pp_rank"]) == (tp_rank, dp_rank, pp_rank)
            assert (res["tp_size"], res["dp_size"], res["pp_size"], res["zero1_size"]) == (tp, dp, pp, zero1)
            assert res["zero1_rank"] == dp_rank % zero1
            for kind in ("tp", "dp", "pp", "zero1"):  # the all-reduce went over exactly the expected members
                (members,) = [g for g in groups[kind] if rank in g]
                assert res["sums"][kind] == sum(members), (cfg, rank, kind)
            assert res["pp_prev_rank"] == (rank - tp * dp if pp_rank > 0 else None)
            assert res["pp_next_rank"] == (rank + tp * dp if pp_rank < pp - 1 else None)
            assert (res["first"], res["last"]) == (pp_rank == 0, pp_rank == pp - 1)


def test_init_parallel_context_world4():
    configs = [dict(tensor=2, pipeline=dict(size=2)), dict(tensor=1, zero1=dict(size=2))]
    _check_grid(4, configs, run_distributed(_grid_worker, 4, configs))


@pytest.mark.slow
def test_init_parallel_context_world8():  # ~30 s on two shared cores: eight interpreters importing torch
    configs = [dict(tensor=2, pipeline=2, zero1=-1), dict(tensor=2, pipeline=2, zero1=1), dict(tensor=2, zero1=2)]
    results = run_distributed(_grid_worker, 8, configs)
    _check_grid(8, configs, results)
    assert [r[2]["zero1_rank"] for r in results] == [0, 0, 1, 1, 0, 0, 1, 1]


def test_tensor_layout_problems_messages():
    tiny = InternLMConfig.preset("internlm-tiny")  # hidden 64, 4 heads, vocab 256, intermediate 176
    assert tensor_layout_problems(tiny, dict(tensor=4, sequence_parallel=True), 8, seq_len=32, micro_bsz=1) == []

    odd = InternLMConfig.preset("internlm-tiny", hidden_size=48, num_attention_heads=6, vocab_size=250)
    problems = tensor_layout_problems(odd, dict(tensor=4, zero1=3, sequence_parallel=True), 6, seq_len=15, micro_bsz=2)
    assert problems[0] == "parallel.tensor / parallel.pipeline.size: world size 6 is not a multiple of tensor (4) * pipeline (1)"
    assert "model.num_attention_heads: 6 is not divisible by parallel.tensor size 4" in problems
    assert "model.hidden_size: 48 is not divisible by parallel.tensor size 4" not in problems
    assert any(p.startswith("model.vocab_size: 250 is not divisible") for p in problems)
    assert any(p.startswith("model.num_kv_attention_heads: 6 kv heads") for p in problems)
    assert problems[-1].startswith("parallel.sequence_parallel: micro_bsz * seq_len = 2 * 15 = 30 tokens")

    mlp = InternLMConfig.preset("internlm-tiny", multiple_of=2, mlp_ratio=2.7)  # ceil(172.8) -> 174
    assert tensor_layout_problems(mlp, dict(tensor=4), 4, 32, 1) == [
        "model.mlp_ratio: intermediate size 174 is not divisible by parallel.tensor size 4"
    ]
    gqa = InternLMConfig.preset("internlm-tiny", hidden_size=96, num_attention_heads=12, num_kv_attention_heads=3,
                                 vocab_size=240, multiple_of=48)  # intermediate 288
    assert tensor_layout_problems(gqa, dict(tensor=6), 6, 32, 1) == []  # 6 % 3 == 0: replicated kv
    assert tensor_layout_problems(gqa, dict(tensor=4), 4, 32, 1) == [
        "model.num_kv_attention_heads: 3 kv heads can neither be split over nor replicated across "
        "parallel.tensor size 4; one must divide the other"
    ]
    zero = tensor_layout_problems(tiny, dict(tensor=2, pipeline=2, zero1=4), 8, 32, 1)
    assert zero == ["parallel.zero1: size 4 does not divide the data-parallel size 2 (world 8 / tensor 2 / "
                    "pipeline 2); use a divisor of 2 or -1"]
