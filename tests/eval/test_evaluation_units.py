"""The evaluator's parts: lm-eval's pair encoding, span packing (each span scored as if alone), the scores'
formulas, the config section and the demo tasks."""

import json

import pytest
import torch

from internlm.config import ConfigError, load_run_config
from internlm.evaluation.demo_tasks import build_demo_tasks
from internlm.evaluation.evaluator import TaskPlan, score_tasks
from internlm.evaluation.spans import SpanLoss, choice_span, pack_spans, text_spans
from internlm.evaluation.tasks import TaskFileError, encode_pair, read_choice_items
from internlm.labels import IGNORE_INDEX
from internlm.model import InternLM, InternLMConfig
from internlm.parallel.pipeline.schedules import NoPipelineSchedule


def _encode(text):  # one id per character: token boundaries are visible in the tests
    return [ord(c) for c in text]


def test_encode_pair_moves_trailing_spaces_and_uses_eos_for_an_empty_context():
    assert encode_pair(_encode, 2, "ab ", "c") == ([97, 98], [32, 99])
    assert encode_pair(_encode, 2, "", "xy") == ([2], [120, 121])


def test_choice_span_labels_only_the_continuation_and_cuts_the_context_from_the_left():
    span = choice_span([1, 2, 3, 4, 5], [6, 7], seq_len=4, where="t")
    assert span.input_ids == (3, 4, 5, 6) and span.labels == (IGNORE_INDEX, IGNORE_INDEX, 6, 7)
    with pytest.raises(ValueError, match="does not fit"):
        choice_span([1], [5, 6, 7, 8, 9], seq_len=4, where="t")


def test_text_spans_score_every_token_once():
    spans = text_spans([5, 6, 7, 8, 9], eos_id=2, seq_len=2)
    assert [s.labels for s in spans] == [(5, 6), (7, 8), (9,)]
    assert [s.input_ids for s in spans] == [(2, 5), (6, 7), (8,)]


def test_packing_splits_micro_batches_over_data_ranks_and_keeps_each_span_once():
    spans = text_spans(list(range(10, 60)), eos_id=2, seq_len=6)  # 9 spans
    seen = []
    for rank in range(2):
        packed = pack_spans(spans, seq_len=8, micro_bsz=2, dp_rank=rank, dp_size=2)
        for mb in packed.batches:
            assert mb["input_ids"].shape == (1, 16) and mb["cu_seqlens_list"][-1] == 16
            ids = mb["span_ids"].tolist()
            seen += sorted(set(ids) - {len(spans)})
    assert sorted(seen) == list(range(len(spans)))


def test_span_loss_scores_each_packed_span_as_if_it_were_alone():
    torch.manual_seed(0)
    config = InternLMConfig(hidden_size=32, num_layers=2, num_attention_heads=4, vocab_size=64, attn_backend="sdpa")
    model = InternLM(config).eval()
    g = torch.Generator().manual_seed(1)
    spans = [choice_span(torch.randint(3, 64, (n,), generator=g).tolist(), [7, 9], 12, "t") for n in (3, 5, 1, 8)]
    packed = pack_spans(spans, seq_len=12, micro_bsz=2, dp_rank=0, dp_size=1)
    loss = SpanLoss(packed.batches, packed.num_spans, torch.device("cpu"), None)
    with torch.no_grad():
        NoPipelineSchedule().forward_backward([model], packed.batches, loss, 1.0, forward_only=True)
        for index, span in enumerate(spans):
            logits = model(torch.tensor([span.input_ids])).float().log_softmax(-1)[0]
            labels = torch.tensor(span.labels)
            scored = labels != IGNORE_INDEX
            alone = -logits[scored].gather(-1, labels[scored][:, None]).sum()
            assert abs(float(loss.values[index]) - float(alone)) < 1e-4, index


def test_scores_follow_lm_eval_multiple_choice():
    # item 1: choice 0 has the higher total, choice 1 the higher per-character log-likelihood (gold 1)
    plan = TaskPlan(dict(name="t", kind="multiple_choice"), 0, [None] * 5, [(2, [2, 10], 1), (3, [1, 1, 1], 2)])
    nll = [4.0, 6.0, 3.0, 2.0, 1.0]
    assert score_tasks([plan], nll)["t"] == dict(acc=0.5, acc_norm=1.0, chance=(1 / 2 + 1 / 3) / 2, items=2.0)
    ppl = TaskPlan(dict(name="p", kind="perplexity"), 0, [None] * 2, [], tokens=4)
    assert score_tasks([ppl], [2.0, 2.0])["p"]["loss"] == 1.0


def test_task_files_and_config_are_checked(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(dict(context="a", choices=["x", "y"], gold=2)) + "\n")
    with pytest.raises(TaskFileError, match="gold"):
        read_choice_items(str(bad))
    with pytest.raises(ConfigError, match="kind"):
        load_run_config("configs/demo.py", overrides=['evaluation.tasks=[{"name": "a", "path": "x", "kind": "mcq"}]'])
    with pytest.raises(ConfigError, match="unique"):
        load_run_config(
            "configs/demo.py", overrides=['evaluation.tasks=[{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]']
        )


def test_demo_tasks_come_from_the_held_out_tail(demo_data, tmp_path):
    run = load_run_config(
        "configs/demo.py",
        overrides=[
            f"data.train_folder={{'{demo_data['docs']}': 1.0}}",
            f"data.tokenizer_path={demo_data['tokenizer']!r}",
        ],
    )
    files = build_demo_tasks(str(tmp_path), run.data)
    items = read_choice_items(files[0])
    assert len(items) >= 50 and all(len(i.choices) == 4 for i in items)
    from internlm.data.demo_corpus import doc_topics

    heldout_text = "".join(doc_topics()[-30:])  # the 2% tail lies inside the last topics
    assert all(i.choices[i.gold] in heldout_text for i in items)
