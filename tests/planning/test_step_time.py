"""The step-time model and `tools/plan.py --recommend`: compute waits for the slowest pipeline stage (uneven layer
splits, the head on the last stage, recomputation counted per chunk as the runtime wraps it), and the ranking tries
every kind of ``model.checkpoint`` with the global batch held."""

from __future__ import annotations

import importlib.util
import os

import pytest

from internlm.model import InternLMConfig
from internlm.parallel import Layout
from internlm.planning import (
    CHECKPOINT_CANDIDATES,
    PLANNER_DEVICES,
    Batch,
    Hardware,
    checkpoint_text,
    checkpointed_layer_count,
)
from internlm.planning.step_time import stage_flops_per_token, step_time
from train_utils import REPO

A100 = Hardware(PLANNER_DEVICES["a100-80gb"])


def _104b(**overrides):
    return InternLMConfig.preset("internlm-104b", dtype="bf16", **overrides)


def test_stage_flops_sum_to_the_model_flops_without_recomputation():
    mc = _104b()
    for pp, chunks in ((1, 1), (4, 1), (4, 2), (4, 4), (8, 2)):
        layout = Layout.create(2048, 8, pp, 8, chunks, True)
        stages = stage_flops_per_token(mc, layout, False, 2048)
        assert len(stages) == pp
        assert sum(stages) == pytest.approx(mc.flops_per_token(2048), rel=1e-12)


def test_uneven_split_and_head_slow_the_step():
    """82 layers over pp4 x 2 chunks: ranks 0 and 1 hold 21 layers, 2 and 3 hold 20 (3 with the head), so the
    step runs at the pace of 21 layers, not at the mean of 20.5 layers plus a quarter of the head."""
    mc = _104b()
    head = 6.0 * mc.vocab_size * mc.hidden_size
    layer = (mc.flops_per_token(2048) - head) / mc.num_layers
    layout = Layout.create(2048, 8, 4, 8, 2, True)
    stages = stage_flops_per_token(mc, layout, False, 2048)
    assert stages == pytest.approx([21 * layer, 21 * layer, 20 * layer, 20 * layer + head])
    batch = Batch(1, 32, 2048)
    times, _ = step_time(mc, layout, batch, False, A100)
    even = mc.flops_per_token(2048) * 32 * 2048 / (8 * 4) / (312e12 * 0.5)
    assert times["compute"] == pytest.approx(even * 21 * layer * 4 / mc.flops_per_token(2048))
    assert times["compute"] > even
    # MFU still counts the model's FLOPs over every device: the imbalance lowers it
    tokens = 64 * 32 * 2048
    assert times["mfu"] == pytest.approx(mc.flops_per_token(2048) * tokens / 2048 / (times["step"] * 312e12))


@pytest.mark.parametrize("setting", [True, 0.5, 0.25, "attn", "mlp"])
def test_recomputation_is_counted_per_chunk(setting):
    """A fraction recomputes round(f x layers) of each chunk (what `apply_activation_checkpointing` wraps): with
    chunks of 5 layers, 0.5 recomputes 2 of each (round half to even), not half of the model."""
    mc = _104b(num_layers=20)
    head = 6.0 * mc.vocab_size * mc.hidden_size
    layer = (mc.flops_per_token(2048) - head) / mc.num_layers
    layout = Layout.create(64, 8, 2, 4, 2, True)  # 4 virtual stages of 5 layers
    plain = stage_flops_per_token(mc, layout, False, 2048)
    extra = [a - b for a, b in zip(stage_flops_per_token(mc, layout, setting, 2048), plain)]
    if setting == "attn":
        expected = 10 * 2.0 * 2048 * mc.hidden_size
    elif setting == "mlp":
        expected = 10 * 6.0 * mc.hidden_size * mc.intermediate_size
    else:
        expected = 2 * checkpointed_layer_count(setting, 5) * layer / 3
    assert extra == pytest.approx([expected, expected])
    if setting == 0.5:
        assert checkpointed_layer_count(0.5, 5) == 2


def test_recommend_tries_every_checkpoint_mode_and_keeps_the_global_batch(capsys):
    assert {False, True, "attn", "mlp"} <= set(CHECKPOINT_CANDIDATES)
    assert any(isinstance(c, float) for c in CHECKPOINT_CANDIDATES)
    spec = importlib.util.spec_from_file_location("plan_tool", os.path.join(REPO, "tools", "plan.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    argv = ["--preset", "internlm-7b", "--devices", "16", "--device-type", "a100-80gb", "--micro-num", "4"]
    assert tool.main(argv + ["--recommend", "--top", "400"]) == 0
    out = capsys.readouterr().out
    assert "global batch 64 sequences x 2048 tokens" in out
    assert "checkpoint " + ", ".join(checkpoint_text(c) for c in CHECKPOINT_CANDIDATES) in out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| ") and "(fits)" in line]
    assert rows
    seen = {row[3].strip() for row in rows}
    assert {"False", "attn", "mlp", "True"} <= seen
    for row in rows:  # dp x micro_num = 64 sequences for every candidate
        dp = int(row[2].split(" dp")[1].split()[0])
        assert dp * int(row[4]) == 64, row
        assert float(row[5].split()[0]) <= 0.92 * 80.0
