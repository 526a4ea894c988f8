"""data.type='streaming': the same batches as the tokenized route of the same documents, exact resume, any
worker count, and the errors a streamed config can hit."""

import gzip
import json
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from internlm.data import build_train_loader, build_valid_batches, train_sentencepiece
from internlm.data.tokenize_corpus import tokenize_to_shards

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two sources of jsonl documents (one gzip-compressed, one split over two files), their tokenized twins and a
    small tokenizer."""
    root = tmp_path_factory.mktemp("streaming")
    rng = np.random.default_rng(0)

    def doc():
        return " ".join(rng.choice(WORDS, size=int(rng.integers(3, 60))))

    (root / "raw_a").mkdir()
    (root / "raw_b").mkdir()
    with gzip.open(root / "raw_a" / "part0.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": doc()}) + "\n" for _ in range(40))
    for part in range(2):
        with open(root / "raw_b" / f"part{part}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": doc(), "id": i}) + "\n" for i in range(15))
    tok = train_sentencepiece([str(doc()) for _ in range(400)], str(root / "tok"), vocab_size=300)
    out = {"tokenizer": tok}
    for name in ("a", "b"):
        out[f"raw_{name}"] = str(root / f"raw_{name}")
        out[f"tok_{name}"] = str(root / f"tok_{name}")
        tokenize_to_shards([out[f"raw_{name}"]], tok, out[f"tok_{name}"], shard_tokens=900, progress=False)
    return out


def data(corpus, kind, **extra):
    ns = dict(
        seq_len=64, micro_bsz=2, micro_num=2, valid_folder=None, valid_ratio=0.0, block_seqs=4,
        tokenizer_path=corpus["tokenizer"], text_key="text", stream_workers=0, type=kind,
        train_folder={corpus[f"{'raw' if kind == 'streaming' else 'tok'}_a"]: 2,
                      corpus[f"{'raw' if kind == 'streaming' else 'tok'}_b"]: 1},
    )  # fmt: skip
    return SimpleNamespace(**(ns | extra))


def batches(loader, steps):
    out = []
    for _ in range(steps):
        mbs = loader.next_global_batch()
        out.append(
            np.concatenate([np.concatenate([mb[k].numpy().ravel() for k in ("input_ids", "labels")]) for mb in mbs])
        )
    return out


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_streaming_draws_the_batches_of_the_tokenized_route_and_resumes_exactly(corpus):
    steps = 40  # 160 sequences of 64 tokens: both sources (about 4,000 and 3,000 tokens) wrap
    tokenized = batches(build_train_loader(data(corpus, "tokenized"), 3, 0, 1), steps)
    streamed = build_train_loader(data(corpus, "streaming"), 3, 0, 1)
    assert same(tokenized, batches(streamed, steps))
    assert min(s.cursor.epoch for s in streamed.sampler.samplers.values()) >= 1

    first = build_train_loader(data(corpus, "streaming", stream_workers=2), 3, 0, 1)
    head = batches(first, 13)
    state = json.loads(json.dumps(first.state_dict()))
    positions = [e["stream"] for e in state["sources"].values()]
    assert all(p["base"] > 0 for p in positions)  # the reader resumes at a document, not at the file start
    resumed = build_train_loader(data(corpus, "streaming"), 3, 0, 1)
    resumed.load_state_dict(state)
    assert same(tokenized, head + batches(resumed, steps - 13))
    assert resumed.pop_messages() == []


def test_streaming_errors(corpus):
    with pytest.raises(ValueError, match="set data.valid_ratio=0 or data.valid_folder"):
        build_valid_batches(data(corpus, "streaming", valid_ratio=0.1, valid_max_samples=8, valid_micro_num=2), 3, 0, 1)
    with pytest.raises(ValueError, match="set data.tokenizer_path"):
        build_train_loader(data(corpus, "streaming", tokenizer_path=None), 3, 0, 1)
    with pytest.raises(ValueError, match="no 'body' field"):
        build_train_loader(data(corpus, "streaming", text_key="body"), 3, 0, 1)


def test_streaming_console_lines(corpus, monkeypatch):
    from internlm.data import streaming

    monkeypatch.setattr(streaming, "REPORT_EVERY", 0.0)  # a rate line after every batch
    monkeypatch.setattr(streaming, "WAIT_WARN", -1.0)  # any wait is reported
    loader = build_train_loader(data(corpus, "streaming"), 3, 0, 1)
    batches(loader, 1)  # the readers' start-up is not a stall
    lines = loader.pop_messages()
    assert [x for x in lines if x.startswith("streaming ")] and not [x for x in lines if "waited" in x]
    batches(loader, 30)
    lines = loader.pop_messages()
    rates = [float(x.split(": ")[1].split(" tokens/s")[0].replace(",", "")) for x in lines if "tokens/s" in x]
    assert rates and max(rates) > 0
    assert any(x.startswith("warning: the step waited") and "data.stream_workers" in x for x in lines)
    del loader  # a dropped loader stops its readers (a new phase builds a new loader)
    deadline = time.monotonic() + 10
    while any(t.name == "internlm-streaming" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "internlm-streaming" for t in threading.enumerate())


def test_switching_between_streamed_and_tokenized_needs_acceptance_then_continues(corpus):
    tokenized = batches(build_train_loader(data(corpus, "tokenized"), 3, 0, 1), 12)
    streamed = build_train_loader(data(corpus, "streaming"), 3, 0, 1)
    head = batches(streamed, 5)
    state = json.loads(json.dumps(streamed.state_dict()))
    with pytest.raises(ValueError, match=r"added shard_00000.bin.*removed part0.jsonl.gz"):
        build_train_loader(data(corpus, "tokenized"), 3, 0, 1).load_state_dict(state)
    switched = build_train_loader(data(corpus, "tokenized", accept_changed_data=True), 3, 0, 1)
    switched.load_state_dict(state)
    assert same(tokenized, head + batches(switched, 7))
    assert all("switched between streamed and tokenized" in x for x in switched.pop_messages())


def test_streaming_ranks_share_the_global_batch_of_one_process(corpus):
    def input_ids(loader, steps):
        return [
            np.concatenate([mb["input_ids"].numpy().ravel() for mb in loader.next_global_batch()]) for _ in range(steps)
        ]

    one = input_ids(build_train_loader(data(corpus, "streaming", micro_num=4), 3, 0, 1), 6)
    ranks = [build_train_loader(data(corpus, "streaming", micro_num=2), 3, r, 2) for r in range(2)]
    per_rank = [input_ids(loader, 6) for loader in ranks]
    assert same(one, [np.concatenate([per_rank[0][s], per_rank[1][s]]) for s in range(6)])  # rank 0's, then 1's
    assert ranks[0].state_dict() == ranks[1].state_dict()
