"""Tokenizer training, tools/tokenizer.py and the shard format."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from internlm.data import RollingShardWriter, Shard, Tokenizer, TokenStream, tokenize_to_shards, train_sentencepiece
from internlm.data.shard import token_dtype
from train_utils import REPO

ROOT = REPO  # the repository root (tests/train_utils.py)
DOCS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. 12345",
    "Unicode: héllo wörld — 日本語 🙂\ttab",
    "  leading spaces and trailing  ",
]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return train_sentencepiece(DOCS * 20, d / "tok", vocab_size=320)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("raw")
    (d / "sub").mkdir()
    (d / "a.txt").write_text(DOCS[0], encoding="utf-8")
    (d / "sub" / "b.txt").write_text(DOCS[1], encoding="utf-8")
    with open(d / "c.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": DOCS[2]}) + "\n\n" + json.dumps({"text": DOCS[3], "meta": 1}) + "\n")
    # folder order: a.txt, c.jsonl, sub/b.txt (sorted paths, recursive)
    return d, [DOCS[0], DOCS[2], DOCS[3], DOCS[1]]


def test_tokenizer_round_trip_and_special_ids(tok_path):
    tok = Tokenizer(tok_path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (320, 1, 2)
    for text in DOCS + ["never seen: ∮ Ω ж"]:
        ids = tok.encode(text)
        assert tok.eos_id not in ids
        assert tok.decode(ids) == text


def test_training_is_deterministic(tmp_path, tok_path):
    # the model file also records its own path (model_prefix), so compare the learned vocabulary
    again = Tokenizer(train_sentencepiece(DOCS * 20, tmp_path / "again", vocab_size=320))
    first = Tokenizer(tok_path)

    def pieces(t):
        return [(t.id_to_piece(i), t.score(i)) for i in range(t.vocab_size)]

    assert pieces(again) == pieces(first)


def test_tokenize_round_trip_with_two_workers(tmp_path, tok_path, inputs):
    folder, expected_docs = inputs
    info = tokenize_to_shards([folder], tok_path, tmp_path / "out", workers=2, shard_tokens=40, progress=False)
    tok = Tokenizer(tok_path)
    expected = [tok.encode(d) + [tok.eos_id] for d in expected_docs]
    assert info["num_docs"] == 4 and info["num_tokens"] == sum(map(len, expected))
    got = []
    for path in info["shards"]:
        shard = Shard(path)
        assert shard.tokens.dtype == np.uint16 and isinstance(shard.tokens, np.memmap)
        got += [shard.document(i).tolist() for i in range(shard.num_docs)]
    assert got == expected
    stream = TokenStream(str(tmp_path / "out"))
    assert stream.read(0, stream.num_tokens).tolist() == sum(expected, [])


def test_worker_count_does_not_change_output(tmp_path, tok_path, inputs):
    folder, _ = inputs
    one = tokenize_to_shards([folder], tok_path, tmp_path / "one", workers=1, progress=False, chunk_bytes=16)
    two = tokenize_to_shards([folder], tok_path, tmp_path / "two", workers=2, progress=False, chunk_bytes=16)
    for a, b in zip(one["shards"], two["shards"], strict=True):
        assert pathlib.Path(a).read_bytes() == pathlib.Path(b).read_bytes()


def test_jsonl_line_without_text_names_file_and_line(tmp_path, tok_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"content": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*'text'"):
        tokenize_to_shards([bad], tok_path, tmp_path / "out", progress=False)
    assert not any(n.endswith(".bin") for n in os.listdir(tmp_path / "out"))  # partial output removed


def test_output_with_shards_is_refused(tmp_path, tok_path, inputs):
    tokenize_to_shards([inputs[0]], tok_path, tmp_path / "out", progress=False)
    with pytest.raises(FileExistsError, match="already holds shards"):
        tokenize_to_shards([inputs[0]], tok_path, tmp_path / "out", progress=False)


def test_command_line_tools(tmp_path, inputs):
    """tools/train_tokenizer.py and tools/tokenizer.py end to end, and the error exit status."""
    folder, expected_docs = inputs
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)

    r = run("tools/train_tokenizer.py", "--input", str(folder), "--vocab-size", "320", "--output", str(tmp_path / "t"))
    assert r.returncode == 0, r.stderr
    r = run(
        "tools/tokenizer.py",
        "--input",
        str(folder),
        "--tokenizer",
        str(tmp_path / "t.model"),
        "--output",
        str(tmp_path / "out"),
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    tok = Tokenizer(tmp_path / "t.model")
    stream = TokenStream(str(tmp_path / "out"))
    assert stream.read(0, stream.num_tokens).tolist() == sum((tok.encode(d) + [2] for d in expected_docs), [])
    r = run(
        "tools/tokenizer.py",
        "--input",
        str(tmp_path / "missing"),
        "--tokenizer",
        str(tmp_path / "t.model"),
        "--output",
        str(tmp_path / "o2"),
    )
    assert r.returncode == 2 and "missing" in r.stderr


def test_command_line_accepts_internlm_flag_names(tmp_path, tok_path, inputs):
    """InternLM's --text_input_path / --bin_output_path are aliases of --input / --output."""
    folder, expected_docs = inputs
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(
        [
            sys.executable,
            "tools/tokenizer.py",
            "--text_input_path",
            str(folder / "a.txt"),
            str(folder / "c.jsonl"),
            str(folder / "sub"),
            "--tokenizer",
            str(tok_path),
            "--bin_output_path",
            str(out),
            "--shard-tokens",
            "20",
            "--no-progress",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    shards = sorted(n for n in os.listdir(out) if n.endswith(".bin"))
    assert len(shards) > 1 and shards[0] == "shard_00000.bin"
    assert all((out / (n + ".meta")).is_file() for n in shards)
    tok = Tokenizer(tok_path)
    stream = TokenStream(str(out))
    assert stream.read(0, stream.num_tokens).tolist() == sum((tok.encode(d) + [2] for d in expected_docs), [])
    assert f"wrote {len(shards)} shards, 4 documents" in r.stdout


def test_shard_dtype_and_rolling(tmp_path):
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.int32
    writer = RollingShardWriter(str(tmp_path), vocab_size=70000, eos_id=2, shard_tokens=5)
    lengths = np.array([3, 4, 2, 6])
    writer.add(np.arange(15) + 65530, lengths)
    paths = writer.close()
    shards = [Shard(p) for p in paths]
    # closed at the first document end at or after 5 tokens: [3, 4] | [2, 6]
    assert [s.num_tokens for s in shards] == [7, 8]
    assert [s.docs.tolist() for s in shards] == [[[0, 3], [3, 4]], [[0, 2], [2, 6]]]
    assert shards[0].tokens.dtype == np.int32 and shards[1].document(1).tolist() == list(range(65539, 65545))


def test_reader_rejects_shard_without_meta(tmp_path):
    (tmp_path / "shard_00000.bin").write_bytes(b"\0\0")
    with pytest.raises(FileNotFoundError, match="shard_00000.bin.meta"):
        TokenStream(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no .bin shards"):
        TokenStream(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TokenStream(str(tmp_path / "missing"))
