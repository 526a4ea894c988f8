"""tools/tokenizer.py inputs: jsonl.gz/zst, parquet, saved Hugging Face datasets, dedup, bad records, resume."""

import gzip
import json
import os
import pathlib
import subprocess
import sys

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from internlm.data import Tokenizer, TokenStream, tokenize_to_shards, train_sentencepiece
from internlm.data.readers import BadRecord, iter_documents
from internlm.data.tokenize_corpus import STATE_FILE
from train_utils import REPO

DOCS = [f"document {i}: " + "héllo wörld, 日本語 " * (i % 7 + 1) + "\n  indented line" for i in range(40)]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return train_sentencepiece(DOCS, tmp_path_factory.mktemp("tok") / "tok", vocab_size=320)


def _jsonl(path, docs, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d, "meta": 1}) + "\n")


def _write(fmt: str, root: pathlib.Path, docs) -> pathlib.Path:
    """``docs`` in format ``fmt`` under ``root``; returns the input path to give the tokenizer."""
    if fmt == "txt":  # one file per document, names sorting in document order
        for i, d in enumerate(docs):
            (root / "txt" / f"{i // 10}").mkdir(parents=True, exist_ok=True)
            (root / "txt" / f"{i // 10}" / f"{i:04d}.txt").write_text(d, encoding="utf-8")
        return root / "txt"
    if fmt == "jsonl.gz":
        (root / "gz").mkdir()
        _jsonl(root / "gz" / "a.jsonl.gz", docs[:25], gzip.open)
        _jsonl(root / "gz" / "b.jsonl.gz", docs[25:], gzip.open)
        return root / "gz"
    if fmt == "jsonl.zst":
        raw = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode("utf-8")
        (root / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
        return root / "a.jsonl.zst"
    if fmt == "parquet":
        pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), root / "a.parquet", row_group_size=7)
        return root / "a.parquet"
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(root / "hf"), num_shards=3)
    return root / "hf"


def test_every_format_gives_the_same_shards_whatever_the_workers(tmp_path, tok_path):
    """Acceptance 1: txt, jsonl.gz, jsonl.zst, parquet and a saved HF dataset of the same documents give
    byte-identical shards, with 1 and 4 workers; the tokens are encode(doc) + [eos] in document order."""
    outputs = {}
    for fmt, workers in [("txt", 1), ("jsonl.gz", 1), ("jsonl.zst", 1), ("parquet", 4), ("hf", 1), ("hf", 4)]:
        src = _write(fmt, tmp_path, DOCS) if (fmt, workers) != ("hf", 4) else tmp_path / "hf"
        out = tmp_path / f"out-{fmt}-{workers}"
        info = tokenize_to_shards(
            [src], tok_path, out, workers=workers, shard_tokens=300, progress=False, chunk_bytes=64
        )
        assert info["num_docs"] == len(DOCS) and len(info["shards"]) > 2
        outputs[(fmt, workers)] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    first = outputs[("txt", 1)]
    assert all(o == first for o in outputs.values())
    tok = Tokenizer(tok_path)
    stream = TokenStream(str(tmp_path / "out-txt-1"))
    assert stream.read(0, stream.num_tokens).tolist() == sum((tok.encode(d) + [tok.eos_id] for d in DOCS), [])


def test_dedup_and_skip_bad_are_counted(tmp_path, tok_path):
    lines = [json.dumps({"text": d}) for d in DOCS[:5]] + [json.dumps({"text": DOCS[1]}), "{not json", ""]
    lines += [json.dumps({"body": "x"}), json.dumps({"text": DOCS[2]})]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(BadRecord, match=r"a\.jsonl:7: invalid JSON"):
        tokenize_to_shards([tmp_path / "a.jsonl"], tok_path, tmp_path / "o1", progress=False)
    assert not [n for n in os.listdir(tmp_path / "o1")]  # nothing recorded as complete: nothing left
    info = tokenize_to_shards(
        [tmp_path / "a.jsonl"], tok_path, tmp_path / "o2", progress=False, dedup="exact", skip_bad=True
    )
    assert (info["num_docs"], info["duplicates"], info["bad_records"]) == (5, 2, 2)
    tok = Tokenizer(tok_path)
    stream = TokenStream(str(tmp_path / "o2"))
    assert stream.read(0, stream.num_tokens).tolist() == sum((tok.encode(d) + [2] for d in DOCS[:5]), [])


def test_errors_name_the_file_and_line_or_row(tmp_path):
    with gzip.open(tmp_path / "u.jsonl.gz", "wb") as f:
        f.write(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(BadRecord, match=r"u\.jsonl\.gz:2: not valid UTF-8"):
        list(iter_documents(tmp_path / "u.jsonl.gz"))
    pq.write_table(pa.table({"text": ["a", None, "b"]}), tmp_path / "n.parquet")
    with pytest.raises(BadRecord, match=r"n\.parquet row 1: 'text' is null"):
        list(iter_documents(tmp_path / "n.parquet"))
    with pytest.raises(BadRecord, match=r"no column 'content' \(columns: text\); set --text-key"):
        list(iter_documents(tmp_path / "n.parquet", text_key="content"))
    (tmp_path / "z.jsonl.zst").write_bytes(b"not zstd at all")
    with pytest.raises(BadRecord, match=r"z\.jsonl\.zst:1: cannot decompress"):
        list(iter_documents(tmp_path / "z.jsonl.zst"))
    assert [d.text for d in iter_documents(tmp_path / "n.parquet", skip_bad=True)] == ["a", "b"]


def test_rerun_after_interruption_finishes_the_remaining_files(tmp_path, tok_path):
    """Files 0 and 1 complete, file 2 is broken (the run stops): the rerun, after the fix, reads only file 2 and
    the shards equal those of an uninterrupted run, dedup state included."""
    src = tmp_path / "src"
    src.mkdir()
    docs = DOCS + DOCS[:3]  # duplicates across files: the dedup set must survive the interruption
    for i in range(3):
        _jsonl(src / f"{i}.jsonl", docs[i * 15 : (i + 1) * 15])
    clean = tokenize_to_shards([src], tok_path, tmp_path / "clean", shard_tokens=400, progress=False, dedup="exact")
    good = (src / "2.jsonl").read_text()
    (src / "2.jsonl").write_text(good + "{broken\n")
    out = tmp_path / "out"
    kw = dict(shard_tokens=400, progress=False, dedup="exact", save_interval=0)
    with pytest.raises(BadRecord, match=r"2\.jsonl:\d+: invalid JSON"):
        tokenize_to_shards([src], tok_path, out, **kw)
    assert (out / STATE_FILE).is_file()
    with pytest.raises(ValueError, match="unfinished tokenizer run with other settings \\(dedup\\)"):
        tokenize_to_shards([src], tok_path, out, **dict(kw, dedup="none"))
    (src / "2.jsonl").write_text(good)
    info = tokenize_to_shards([src], tok_path, out, **kw)
    assert info["resumed_files"] == 2 and info["duplicates"] == clean["duplicates"] == 3
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "clean"))
    for name in os.listdir(out):
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name


def test_command_line_empty_input_exits_2_and_prints_the_summary(tmp_path, tok_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.jsonl").write_text("\n\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "tools/tokenizer.py", "--tokenizer", str(tok_path), "--output", str(tmp_path / "o")]
    r = subprocess.run(cmd + ["--input", str(tmp_path / "empty")], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"no documents were found in {tmp_path / 'empty'}" in r.stderr
    assert not os.listdir(tmp_path / "o")
    pq.write_table(pa.table({"body": DOCS[:4] + DOCS[:2]}), tmp_path / "b.parquet")
    args = ["--input", str(tmp_path / "b.parquet"), "--text-key", "body", "--dedup", "exact"]
    r = subprocess.run(cmd + args, cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "tokenize: 1/1 files, 4 docs, " in r.stderr and "ETA" in r.stderr
    assert "wrote 1 shards, 4 documents," in r.stdout and "2 duplicate documents dropped" in r.stdout
    assert np.fromfile(tmp_path / "o" / "shard_00000.bin", dtype="<u2").size > 0
