"""Process-group grid, the Layout value and its checks."""

import pytest
import torch
import torch.distributed as dist

from distributed_utils import run_distributed
from internlm.model import InternLMConfig
from internlm.parallel import (
    Layout,
    ParallelContext,
    describe_groups,
    init_parallel_context,
)
from internlm.problems import Problem


def _fit(model, world, micro_bsz=1, seq_len=32, **sizes):
    """The problems of ``model`` under ``Layout.create(world, **sizes)``, as "key: message" lines."""
    return [str(p) for p in Layout.create(world, **sizes).fit_problems(model, micro_bsz, seq_len, micro_num=8)]


def test_group_ranks_world8_tp2_pp2():
    groups = Layout.create(8, tensor=2, pipeline=2, zero1=1).group_ranks()
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert groups["zero1"] == [[0], [2], [1], [3], [4], [6], [5], [7]]
    assert Layout.create(8, tensor=2, pipeline=2, zero1=2).group_ranks()["zero1"] == groups["dp"]


def test_zero1_subgroups_are_consecutive_dp_blocks():
    groups = Layout.create(16, tensor=2, pipeline=1, zero1=4).group_ranks()  # dp = 8
    assert groups["dp"][0] == [0, 2, 4, 6, 8, 10, 12, 14]
    assert groups["zero1"] == [[0, 2, 4, 6], [8, 10, 12, 14], [1, 3, 5, 7], [9, 11, 13, 15]]


def test_layout_sizes_and_problems():
    layout = Layout.create(8, tensor=2, pipeline=2, zero1=-1)
    assert (layout.tensor, layout.pipeline, layout.data, layout.zero1) == (2, 2, 2, 2)
    assert Layout.create(4, zero1=0).zero1 == 4
    assert Layout.create(8, zero1=2, sequence_parallel=True).sequence_parallel is True
    assert (
        Layout.from_dict(layout.to_dict()) == layout
        and layout.describe() == "tp2 x pp2 x dp2 (zero1 2, 1 chunk, 8 ranks)"
    )
    assert layout.coords(5) == (1, 0, 1) and layout.rank_of(1, 0, 1) == 5
    assert Layout.create(6, tensor=4).problems() == [
        Problem(
            "parallel.tensor / parallel.pipeline.size", "world size 6 is not a multiple of tensor (4) * pipeline (1)"
        )
    ]
    (problem,) = Layout.create(8, tensor=2, zero1=3).problems()
    assert problem.key == "parallel.zero1" and problem.message.startswith(
        "size 3 does not divide the data-parallel size 4"
    )
    with pytest.raises(ValueError, match=r"parallel.zero1: size 3 does not divide the data-parallel size 4"):
        init_parallel_context(Layout.create(8, tensor=2, zero1=3), 0)
    with pytest.raises(ValueError, match="not a layout record"):
        Layout.from_dict(dict(world_size=2))


def test_single_and_describe():
    pc = ParallelContext()
    assert (pc.tp_size, pc.pp_size, pc.dp_size, pc.zero1_size) == (1, 1, 1, 1)
    assert pc.tp_group is None and pc.is_first_stage and pc.is_last_stage
    assert init_parallel_context(Layout.single(), 0) == ParallelContext()
    big = ParallelContext(layout=Layout.create(8, tensor=2, pipeline=2, zero1=2))
    text = describe_groups(big)
    assert "world 8 = tensor 2 x data 2 x pipeline 2" in text
    assert "tp    groups (4): [0,1] [2,3] [4,5] [6,7]" in text
    assert "pp    groups (4): [0,4] [1,5] [2,6] [3,7]" in text
    assert "zero1 groups (4): [0,2] [1,3] [4,6] [5,7]" in text


def _grid_worker(rank, world_size, configs):
    out = []
    for cfg in configs:
        pc = init_parallel_context(Layout.create(world_size, **cfg), rank)
        sums = {}
        for kind in ("tp", "dp", "pp", "zero1"):
            t = torch.tensor([float(rank)])
            dist.all_reduce(t, group=getattr(pc, f"{kind}_group"))
            sums[kind] = int(t.item())
        fields = {
            k: getattr(pc, k)
            for k in (
                "tp_rank",
                "dp_rank",
                "pp_rank",
                "zero1_rank",
                "tp_size",
                "dp_size",
                "pp_size",
                "zero1_size",
                "pp_prev_rank",
                "pp_next_rank",
            )
        }
        out.append(dict(fields, sums=sums, first=pc.is_first_stage, last=pc.is_last_stage))
    return out


def _check_grid(world, configs, results):
    for i, cfg in enumerate(configs):
        layout = Layout.create(world, **cfg)
        tp, pp, dp, zero1 = layout.tensor, layout.pipeline, layout.data, layout.zero1
        groups = layout.group_ranks()
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
    configs = [dict(tensor=2, pipeline=2), dict(tensor=1, zero1=2)]
    _check_grid(4, configs, run_distributed(_grid_worker, 4, configs))


@pytest.mark.slow
def test_init_parallel_context_world8():  # ~30 s on two shared cores: eight interpreters importing torch
    configs = [dict(tensor=2, pipeline=2, zero1=-1), dict(tensor=2, pipeline=2, zero1=1), dict(tensor=2, zero1=2)]
    results = run_distributed(_grid_worker, 8, configs)
    _check_grid(8, configs, results)
    assert [r[2]["zero1_rank"] for r in results] == [0, 0, 1, 1, 0, 0, 1, 1]


def test_tensor_split_problems_messages():
    tiny = InternLMConfig.preset("internlm-tiny")  # hidden 64, 4 heads, vocab 256, intermediate 176
    assert _fit(tiny, 8, micro_bsz=1, seq_len=32, tensor=4, sequence_parallel=True) == []

    odd = InternLMConfig.preset("internlm-tiny", hidden_size=48, num_attention_heads=6, vocab_size=250)
    problems = _fit(odd, 6, micro_bsz=2, seq_len=15, tensor=4, zero1=3, sequence_parallel=True)
    assert (
        problems[0]
        == "parallel.tensor / parallel.pipeline.size: world size 6 is not a multiple of tensor (4) * pipeline (1)"
    )
    assert "model.num_attention_heads: 6 is not divisible by parallel.tensor size 4" in problems
    assert "model.hidden_size: 48 is not divisible by parallel.tensor size 4" not in problems
    assert any(p.startswith("model.vocab_size: 250 is not divisible") for p in problems)
    assert any(p.startswith("model.num_kv_attention_heads: 6 kv heads") for p in problems)
    assert problems[-1].startswith("parallel.sequence_parallel: micro_bsz * seq_len = 2 * 15 = 30 tokens")

    mlp = InternLMConfig.preset("internlm-tiny", multiple_of=2, mlp_ratio=2.7)  # ceil(172.8) -> 174
    assert _fit(mlp, 4, micro_bsz=1, seq_len=32, tensor=4) == [
        "model.mlp_ratio: intermediate size 174 is not divisible by parallel.tensor size 4"
    ]
    gqa = InternLMConfig.preset(
        "internlm-tiny",
        hidden_size=96,
        num_attention_heads=12,
        num_kv_attention_heads=3,
        vocab_size=240,
        multiple_of=48,
    )  # intermediate 288
    assert _fit(gqa, 6, micro_bsz=1, seq_len=32, tensor=6) == []  # 6 % 3 == 0: replicated kv
    assert _fit(gqa, 4, micro_bsz=1, seq_len=32, tensor=4) == [
        "model.num_kv_attention_heads: 3 kv heads can neither be split over nor replicated across "
        "parallel.tensor size 4; one must divide the other"
    ]
    zero = _fit(tiny, 8, micro_bsz=1, seq_len=32, tensor=2, pipeline=2, zero1=4)
    assert zero == [
        "parallel.zero1: size 4 does not divide the data-parallel size 2 (world 8 / tensor 2 / "
        "pipeline 2); use a divisor of 2 or -1"
    ]
