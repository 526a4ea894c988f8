"""Layer partition, layout checks and per-stage model chunks (single process)."""

import pytest
import torch

from internlm.model import InternLM, InternLMConfig
from internlm.parallel.pipeline import build_pipeline_chunks, partition_layers, pipeline_problems


def _flat(layout):
    return [list(r) for stage in layout for r in stage]


def test_partition_even_split():
    assert partition_layers(8, 4) == [[range(0, 2)], [range(2, 4)], [range(4, 6)], [range(6, 8)]]
    assert partition_layers(4, 1) == [[range(0, 4)]]


def test_partition_remainder_goes_to_first_virtual_stages():
    assert partition_layers(10, 4) == [[range(0, 3)], [range(3, 6)], [range(6, 8)], [range(8, 10)]]


def test_partition_interleaved_is_chunk_major():
    # 10 layers over 2 stages x 2 chunks: virtual stages 0..3 hold 3, 3, 2, 2 layers;
    # virtual stage v = chunk * pp + stage.
    layout = partition_layers(10, 2, 2)
    assert layout == [[range(0, 3), range(6, 8)], [range(3, 6), range(8, 10)]]
    layout = partition_layers(8, 2, 4)
    assert layout[0] == [range(0, 1), range(2, 3), range(4, 5), range(6, 7)]
    assert layout[1] == [range(1, 2), range(3, 4), range(5, 6), range(7, 8)]
    # every layer exactly once
    assert sorted(i for r in _flat(layout) for i in r) == list(range(8))


def test_partition_rejects_too_few_layers():
    with pytest.raises(ValueError, match="3 layers cannot fill"):
        partition_layers(3, 2, 2)


def test_layout_problems():
    assert pipeline_problems(8, 2, 2, 4) == []
    assert pipeline_problems(8, 1, 1, 1) == []
    (msg,) = map(str, pipeline_problems(3, 2, 2, 4))
    assert msg.startswith("model.num_layers:") and "parallel.pipeline.size * model.num_chunks" in msg
    (msg,) = map(str, pipeline_problems(8, 4, 1, 2))
    assert msg.startswith("data.micro_num:") and "smaller than parallel.pipeline.size=4" in msg
    (msg,) = map(str, pipeline_problems(8, 2, 2, 3))
    assert msg.startswith("data.micro_num:") and "multiple of parallel.pipeline.size=2" in msg
    (msg,) = map(str, pipeline_problems(8, 1, 2, 4))
    assert msg.startswith("model.num_chunks:")
    assert len(pipeline_problems(2, 2, 2, 3)) == 2
    assert all("\n" not in str(m) for m in pipeline_problems(2, 1, 4, 0))


def test_chunks_hold_their_layers_with_full_model_names():
    config = InternLMConfig.preset("internlm-tiny", num_layers=6)
    full_names = {n: p.shape for n, p in InternLM(config).named_parameters()}
    seen = {}
    for rank in range(2):
        chunks = build_pipeline_chunks(config, rank, 2, num_chunks=2)
        assert len(chunks) == 2
        for c, chunk in enumerate(chunks):
            assert all(p.is_meta for p in chunk.parameters())
            virtual = c * 2 + rank
            assert (chunk.embed_tokens is not None) == (virtual == 0)
            assert (chunk.lm_head is not None) == (chunk.norm is not None) == (virtual == 3)
            assert [int(k) for k in chunk.layers.keys()] == list(partition_layers(6, 2, 2)[rank][c])
            for name, p in chunk.named_parameters():
                assert name not in seen
                seen[name] = p.shape
    assert seen == full_names


def test_materialised_chunks_equal_full_model_weights():
    config = InternLMConfig.preset("internlm-tiny", num_layers=4)
    full = dict(InternLM(config).named_parameters())  # initialised with seed 0
    for rank in range(2):
        for chunk in build_pipeline_chunks(config, rank, 2, device="cpu"):
            for name, p in chunk.named_parameters():
                torch.testing.assert_close(p, full[name], rtol=0, atol=0)
        meta = build_pipeline_chunks(config, rank, 2)[0]
        meta.to_empty(device="cpu")
        meta.init_weights(0)
        for name, p in meta.named_parameters():
            torch.testing.assert_close(p, full[name], rtol=0, atol=0)
