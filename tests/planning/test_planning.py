"""The planning package's single sources: parameters per stage (replicated kv heads counted), the pipeline order
the schedules run, the attention backend the model would pick, layout text, the device table, and every
``model.checkpoint`` mode through tools/plan.py."""

from __future__ import annotations

import importlib.util
import os
import types

import pytest
import torch

from internlm.model import InternLMConfig
from internlm.model.attention import resolve_backend
from internlm.parallel import Layout
from internlm.parallel.pipeline import interleaved, schedule_order, schedules
from internlm.planning import (
    PEAK_TFLOPS,
    PLANNER_DEVICES,
    checkpoint_text,
    layer_params,
    most_loaded_stage_params,
    parse_checkpoint,
    planned_attn_backend,
    stage_params,
)
from train_utils import REPO


def test_stage_params_count_replicated_kv_heads():
    # 4 query heads, 2 kv heads over tensor 4: the kv heads do not split, every rank holds the whole k and v
    mc = InternLMConfig(hidden_size=64, num_layers=4, num_attention_heads=4, num_kv_attention_heads=2, vocab_size=256)
    h, f, kv = 64, mc.intermediate_size, mc.kv_dim  # kv = 2 heads x 16
    q = h * h // 4 + h // 4
    k = kv * h + kv  # replicated: full weight and bias
    o = h * h // 4 + h
    assert layer_params(mc, 4) == q + 2 * k + o + 3 * h * f // 4 + 2 * h
    layout = Layout.create(8, tensor=4, pipeline=2)
    first = 2 * layer_params(mc, 4) + 256 * h // 4
    last = 2 * layer_params(mc, 4) + h + 256 * h // 4
    assert [stage_params(mc, layout, r) for r in range(2)] == [first, last]
    assert most_loaded_stage_params(mc, layout) == last
    # one tensor rank: the stages add up to the model, however the pipeline is cut
    for pp, chunks in ((1, 1), (2, 1), (2, 2), (4, 1)):
        layout = Layout.create(pp, pipeline=pp, num_chunks=chunks)
        assert sum(stage_params(mc, layout, r) for r in range(pp)) == mc.num_params()


class _Marker:
    def __init__(self, chunk: int, index: int) -> None:
        self.chunk, self.index = chunk, index


class _DoneExchange:
    from_prev = from_next = None

    def wait(self) -> "_DoneExchange":
        return self


class _FakeP2P:
    """Stands in for `PipelineP2P`: every receive returns None, every exchange is already complete."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def exchange(self, device, **kwargs):
        return _DoneExchange()


def _run_order(monkeypatch, pp_size, pp_rank, num_chunks, micro_num, forward_only):
    """The (kind, chunk, micro-batch) order a schedule object actually runs, its steps replaced by recorders."""
    ops = []
    chunks = [torch.nn.Linear(1, 1) for _ in range(num_chunks)]

    def forward_step(chunk, x, mb, *args):
        c = chunks.index(chunk)
        ops.append(("F", c, mb["i"]))
        return _Marker(c, mb["i"])

    def backward_step(inp, out, dy):
        ops.append(("B", out.chunk, out.index))

    for module in (schedules, interleaved):
        monkeypatch.setattr(module, "forward_step", forward_step)
        monkeypatch.setattr(module, "backward_step", backward_step)
        monkeypatch.setattr(module, "as_stage_input", lambda x, forward_only: x)
    pc = types.SimpleNamespace(pp_size=pp_size, pp_rank=pp_rank, tp_size=1, sequence_parallel=False)
    if pp_size == 1:
        schedule = schedules.NoPipelineSchedule()
    elif num_chunks == 1:
        schedule = schedules.OneFOneBSchedule.__new__(schedules.OneFOneBSchedule)
        schedule.pp_rank, schedule.pp_size, schedule.peak_activations = pp_rank, pp_size, 0
    else:
        schedule = interleaved.InterleavedSchedule.__new__(interleaved.InterleavedSchedule)
        schedule.pp_rank, schedule.pp_size, schedule.num_chunks = pc.pp_rank, pc.pp_size, num_chunks
        schedule.overlap, schedule.peak_activations = False, 0
    schedule.p2p = _FakeP2P()
    micro_batches = [{"i": i, "input_ids": None} for i in range(micro_num)]
    schedule.forward_backward(chunks, micro_batches, None, 1.0, forward_only=forward_only)
    return ops


@pytest.mark.parametrize(
    "pp_size,num_chunks,micro_num", [(1, 1, 3), (2, 1, 1), (2, 1, 4), (4, 1, 3), (4, 1, 8), (2, 2, 4), (4, 2, 8)]
)
def test_schedule_order_is_what_the_schedules_run(monkeypatch, pp_size, num_chunks, micro_num):
    for rank in range(pp_size):
        for forward_only in (False, True):
            ran = _run_order(monkeypatch, pp_size, rank, num_chunks, micro_num, forward_only)
            assert ran == schedule_order(pp_size, rank, num_chunks, micro_num, forward_only), (rank, forward_only)


def test_attention_backend_is_the_models_rule():
    for dtype, expected in ((torch.bfloat16, "flash"), (torch.float16, "flash"), (torch.float32, "sdpa")):
        mc = InternLMConfig.preset("internlm-tiny", dtype=dtype)
        assert planned_attn_backend(mc) == resolve_backend("auto", "cuda", dtype, flash_installed=True) == expected
        assert planned_attn_backend(mc, "reference") == "reference"
    with pytest.raises(ValueError, match="unknown attention backend"):
        planned_attn_backend(mc, "fast")


def test_layout_text_styles():
    layout = Layout.create(16, tensor=2, pipeline=2, zero1=2, num_chunks=2, sequence_parallel=True)
    assert layout.describe() == "tp2+sp x pp2 x dp4 (zero1 2, 2 chunks, 16 ranks)"
    assert layout.describe("sentence") == (
        "16 devices = tensor 2 x pipeline 2 (chunks 2) x data 4; zero1 2; sequence parallel True"
    )
    assert layout.describe("compact") == "tp2+sp pp2 x2 chunks dp4 zero1=2"
    assert Layout.single().describe("compact") == "tp1 pp1 dp1 zero1=1"
    with pytest.raises(ValueError, match="style"):
        layout.describe("long")


def test_one_device_table():
    for name, device in PLANNER_DEVICES.items():
        assert device.memory_gib > 0 and device.intra_bw > 0 and device.inter_bw > 0, name
        assert all(PEAK_TFLOPS[cuda] == device.peak_tflops for cuda in device.cuda_names), name
    assert PLANNER_DEVICES["h100-sxm"].peak_tflops == PEAK_TFLOPS["NVIDIA H100 80GB HBM3"] == 989.0


def _plan_tool():
    spec = importlib.util.spec_from_file_location("plan_tool", os.path.join(REPO, "tools", "plan.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_tool_accepts_every_checkpoint_mode(capsys):
    """Every ``model.checkpoint`` the config accepts: True, False, a fraction, 'attn', 'mlp' (the schema's list)."""
    assert [parse_checkpoint(t) for t in ("true", "False", "0.25", "attn", "MLP")] == [True, False, 0.25, "attn", "mlp"]
    with pytest.raises(Exception, match="attn"):
        parse_checkpoint("some")
    tool = _plan_tool()
    totals = {}
    for text in ("False", "True", "0.5", "attn", "mlp"):
        argv = ["--preset", "internlm-7b", "--devices", "8", "--tensor", "2", "--checkpoint", text]
        assert tool.main(argv) == 0, text
        out = capsys.readouterr().out
        setting = parse_checkpoint(text)
        assert f"checkpoint {checkpoint_text(setting)}; attention backend flash" in out, out
        total = next(line for line in out.splitlines() if line.startswith("| total |"))
        totals[text] = float(total.split("|")[2].replace(",", ""))
        assert "step time estimate" in out
    # selective recomputation keeps more than whole layers and no more than none ("attn" frees only the softmax
    # statistics here: below the printed 0.1 GiB)
    assert totals["True"] < totals["attn"] <= totals["False"] and totals["True"] < totals["mlp"] < totals["False"]
    assert tool.main(["--config", os.path.join(REPO, "configs", "demo.py"), "--devices", "1", "--set",
                      "model.checkpoint=attn"]) == 0  # fmt: skip
    assert "checkpoint attn" in capsys.readouterr().out


def test_plan_tool_config_with_layout_flags(capsys):
    """--config with layout and batch flags: the flags replace the config's layout (tensor, pipeline, chunks, SP,
    zero1) and batch; what the flags leave alone stays the config's (configs/internlm_7b/phase1.py: S 2048)."""
    tool = _plan_tool()
    config = os.path.join(REPO, "configs", "internlm_7b", "phase1.py")
    flags = ["--tensor", "2", "--sp", "--pipeline", "2", "--chunks", "2", "--zero1", "8", "--micro-num", "4"]
    assert tool.main(["--config", config, "--devices", "64", "--device-type", "a100-80gb", *flags]) == 0
    out = capsys.readouterr().out
    assert "layout: tp2+sp x pp2 x dp16 (zero1 8, 2 chunks, 64 ranks)" in out, out
    assert "batch: seq_len 2,048 x micro_bsz 1 x micro_num 4 x dp 16 = 64 sequences" in out, out
    plan = tool.plan_inputs(tool.parse_args(["--config", config, "--devices", "64", *flags]))
    assert (plan.layout.tensor, plan.layout.pipeline, plan.layout.num_chunks, plan.layout.zero1) == (2, 2, 2, 8)
    # a layout the flags make impossible is refused with the reason (exit 2), not planned
    assert tool.main(["--config", config, "--devices", "64", "--tensor", "3"]) == 2
    assert "the given layout cannot run" in capsys.readouterr().out
