"""Megatron indexed datasets (.bin/.idx) as sources, written by megatron-core's own builder; token-id range check."""

import os
import shutil
import types

import numpy as np
import pytest
import torch
from megatron.core.datasets import indexed_dataset  # the test extra installs megatron-core

from internlm.data import TokenStream, build_train_loader
from internlm.data.indexed import IndexedShard
from internlm.data.sources import token_id_problem
from internlm.labels import IGNORE_INDEX
from train_utils import main_in_process, run_train, step_losses, write_base


def _documents(seed: int, count: int, vocab: int):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(1, 40))).astype(np.int64) for _ in range(count)]


def _build(prefix: str, docs, dtype=np.uint16) -> None:
    """Write ``docs`` with Megatron's builder: odd documents as several sequences (add_document with lengths),
    even ones as one item each (add_item + end_document), as preprocess_data.py does with and without
    sentence splitting."""
    builder = indexed_dataset.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for i, doc in enumerate(docs):
        if i % 2 and doc.size > 2:
            cut = doc.size // 3
            builder.add_document(doc, [cut, doc.size - cut])
        else:
            builder.add_item(torch.from_numpy(doc))
            builder.end_document()
    builder.finalize(prefix + ".idx")


def _data(train_folder, **kw):
    values = dict(seq_len=16, micro_bsz=2, micro_num=2, valid_folder=None, valid_ratio=0.0, valid_max_samples=8)
    values.update(valid_micro_num=None, block_seqs=1, train_folder=train_folder)
    values.update(kw)
    return types.SimpleNamespace(**values)


def test_loader_yields_the_builder_documents(tmp_path):
    """Acceptance 2: the tokens the loader yields are the builder's input documents, in order, and positions
    restart (labels stop) at every document boundary. block_seqs=1 makes the windows consecutive."""
    docs = _documents(0, 60, 2048)
    (tmp_path / "mg").mkdir()
    _build(str(tmp_path / "mg" / "corpus_text_document"), docs)
    flat = np.concatenate(docs)
    ends = np.cumsum([d.size for d in docs])
    for source in (str(tmp_path / "mg" / "corpus_text_document"), str(tmp_path / "mg")):  # prefix and folder
        stream = TokenStream(source)
        assert stream.num_docs == len(docs) and stream.read(0, stream.num_tokens).tolist() == flat.tolist()
        assert stream.doc_ends(0, stream.num_tokens).tolist() == ends.tolist()
    loader = build_train_loader(_data(str(tmp_path / "mg" / "corpus_text_document")), 0, 0, 1)
    windows = (flat.size - 1) // 16
    seen, positions, labels = [], [], []
    while len(seen) < windows * 16:
        for mb in loader.next_global_batch():
            seen += mb["input_ids"].view(-1).tolist()
            positions += mb["position_ids"].view(-1).tolist()
            labels += mb["labels"].view(-1).tolist()
    n = windows * 16
    assert seen[:n] == flat[:n].tolist()
    starts = {0} | {int(e) for e in ends if e < n} | set(range(0, n, 16))
    expected_pos, p = [], 0
    for i in range(n):
        p = 0 if i in starts else p + 1
        expected_pos.append(p)
    assert positions[:n] == expected_pos
    doc_last = {int(e) - 1 for e in ends}
    assert [labels[i] == IGNORE_INDEX for i in range(n)] == [i in doc_last or False for i in range(n)]


def test_bad_indexed_files_are_named(tmp_path):
    _build(str(tmp_path / "f"), _documents(1, 3, 100), dtype=np.float32)
    with pytest.raises(ValueError, match=r"f\.idx: tokens are stored as float32, not integer ids"):
        IndexedShard(str(tmp_path / "f.bin"))
    (tmp_path / "both").mkdir()
    _build(str(tmp_path / "both" / "a"), _documents(2, 3, 100))
    shutil.copy(tmp_path / "both" / "a.bin", tmp_path / "both" / "b.bin")
    (tmp_path / "both" / "b.bin.meta").write_bytes(b"ILMSHARD")
    with pytest.raises(ValueError, match="holds both Megatron .bin/.idx pairs .* put them in two folders"):
        TokenStream(str(tmp_path / "both"))
    _build(str(tmp_path / "t"), _documents(3, 5, 100))
    with open(tmp_path / "t.idx", "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / "t.idx") - 8)
    with pytest.raises(ValueError, match=r"t\.idx: .* bytes, but its header needs"):
        TokenStream(str(tmp_path / "t"))


def test_token_ids_past_the_vocabulary_are_named(tmp_path):
    docs = _documents(4, 10, 100)
    docs[7][3] = 2100
    _build(str(tmp_path / "big"), docs, dtype=np.int32)
    problem = token_id_problem(TokenStream(str(tmp_path / "big")).shards, 2048)
    assert problem.startswith(f"shard {tmp_path / 'big.bin'} holds token id 2100 (stored as int32)")
    assert "model.vocab_size=2048" in problem
    assert token_id_problem(TokenStream(str(tmp_path / "big")).shards, 2101) is None


def test_training_on_a_mixture_with_a_megatron_source(tmp_path, demo_data):
    """An indexed dataset written by Megatron's builder trains, mixed with a tokenized folder; then the issue-19
    case: a shard of that folder holding ids >= model.vocab_size stops the run at the first window read from it with
    one line naming the shard (exit 2), not an IndexError in the embedding."""
    _build(str(tmp_path / "corpus_text_document"), _documents(5, 200, 2048))
    work_dir = str(tmp_path / "work")
    cfg = write_base(str(tmp_path / "cfg"), demo_data, work_dir)
    code = str(tmp_path / "code")
    shutil.copytree(demo_data["code"], code)
    mix = f"data.train_folder={{{str(tmp_path / 'corpus_text_document')!r}: 0.5, {code!r}: 0.5}}"
    sets = [mix, "data.total_steps=2", "ckpt.enable_save_ckpt=False"]
    run_train([cfg], sets=sets)
    losses = step_losses(work_dir)
    assert sorted(losses) == [1, 2] and all(np.isfinite(v) for v in losses.values())
    shard = os.path.join(code, sorted(n for n in os.listdir(code) if n.endswith(".bin"))[0])
    tokens = np.memmap(shard, dtype="<u2", mode="r+")
    tokens[5::50] = 3000  # in every window the first step can draw from this shard
    tokens.flush()
    del tokens
    status, _, err = main_in_process(["--config", cfg, "--set", *sets, f"work_dir={str(tmp_path / 'work2')!r}"])
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"shard {shard} holds token id 3000" in lines[0] and "model.vocab_size=2048" in lines[0]
