"""Step communication, checkpoint size and parameter-count formulas (internlm/planning) on hand-checked cases."""

import pytest

from internlm.model import InternLMConfig
from internlm.parallel import Layout
from internlm.planning import checkpoint_bytes, most_loaded_stage_params, stage_params, step_communication


def test_tensor_pipeline_and_data_bytes():
    mc = InternLMConfig(
        hidden_size=64, num_layers=4, num_attention_heads=4, vocab_size=256, multiple_of=32, dtype="bf16"
    )
    layout = Layout.create(16, tensor=2, pipeline=2, zero1=2, num_chunks=2, sequence_parallel=True)  # data 4
    c = step_communication(mc, layout, micro_bsz=1, seq_len=8, micro_num=4, checkpoint=False)
    n_bytes = 1 * 8 * 64 * 2
    assert c.tensor == pytest.approx(4 * (2 * 8 * 0.5 * n_bytes + 2 * 0.5 * n_bytes))  # 2 layers per stage
    assert c.pipeline == pytest.approx(2 * 2 * 4 * n_bytes / 2)  # SP: S/T-sharded hidden states
    params = most_loaded_stage_params(mc, layout)  # one tensor rank of the most loaded stage
    assert c.data_gradients == pytest.approx(0.5 * 4 * params + 2 * 0.5 * 4 * params / 2)  # 2 replicas
    assert c.data_params == pytest.approx(0.5 * 2 * params)
    assert sum(c.by_link().values()) == pytest.approx(c.tensor + c.pipeline + c.data)
    again = step_communication(mc, layout, micro_bsz=1, seq_len=8, micro_num=4, checkpoint=True)
    assert again.tensor > c.tensor and again.data == c.data  # recomputation repeats only the forward collectives


def test_single_device_sends_nothing_and_checkpoint_size():
    mc = InternLMConfig.preset("internlm-tiny")
    c = step_communication(mc, Layout.single(), micro_bsz=2, seq_len=16, micro_num=2, checkpoint=True)
    assert (c.tensor, c.pipeline, c.data) == (0.0, 0.0, 0.0)
    assert most_loaded_stage_params(mc, Layout.single()) == mc.num_params()
    size = checkpoint_bytes(mc)
    assert size["optimizer"] == 12 * mc.num_params() and size["total"] == size["model"] + size["optimizer"]


def test_per_rank_bytes_and_recomputed_collectives():
    """What `internlm.simulation` measured: the ends of a pipeline send fewer messages, a rank's own stage sets its
    layers and data bytes, full recomputation repeats 10 (11 with SP) collective volumes per layer, "mlp" none,
    and one stage holds both the embedding and the head."""
    mc = InternLMConfig(
        hidden_size=64, num_layers=4, num_attention_heads=4, vocab_size=256, multiple_of=32, dtype="bf16"
    )
    n_bytes = 1 * 8 * 64 * 2
    kw = dict(micro_bsz=1, seq_len=8, micro_num=4)
    interleaved = Layout.create(16, tensor=2, pipeline=2, zero1=2, num_chunks=2, sequence_parallel=True)
    first = step_communication(mc, interleaved, **kw, pipeline_rank=0)
    assert first.pipeline == pytest.approx((2 * 2 - 1) * 4 * n_bytes / 2)  # chunk 0 sends no gradient back
    params = stage_params(mc, interleaved, 0)
    assert first.data_gradients == pytest.approx(0.5 * 4 * params + 2 * 0.5 * 4 * params / 2)
    one_f_one_b = Layout.create(4, pipeline=4)  # 1 layer per stage
    middle, last = (step_communication(mc, one_f_one_b, **kw, pipeline_rank=r) for r in (1, 3))
    assert (middle.pipeline, last.pipeline) == (2 * 4 * n_bytes, 4 * n_bytes)
    tensor = Layout.create(2, tensor=2)
    plain, full, mlp = (step_communication(mc, tensor, **kw, checkpoint=c).tensor for c in (False, True, "mlp"))
    ends = 2 * 2 * 0.5 * n_bytes  # embedding and head, both on the one stage
    assert plain == pytest.approx(4 * (4 * 8 * 0.5 * n_bytes + ends))
    assert full == pytest.approx(4 * (4 * 10 * 0.5 * n_bytes + ends)) and mlp == plain
    sp = Layout.create(2, tensor=2, sequence_parallel=True)
    assert step_communication(mc, sp, **kw, checkpoint=True).tensor == pytest.approx(
        4 * (4 * 11 * 0.5 * n_bytes + ends)
    )
