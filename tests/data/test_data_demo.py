"""The demo corpus: built once from text shipped with Python, cached, rebuilt when incomplete."""

import json
import os

from internlm.data import Tokenizer, TokenStream, prepare_demo_data
from internlm.data.demo_corpus import doc_topics


def _mtimes(folder):
    return {p: os.stat(p).st_mtime_ns for p in sorted(str(q) for q in folder.rglob("*") if q.is_file())}


def test_demo_corpus_is_prepared_once_and_cached(tmp_path):
    paths = prepare_demo_data(tmp_path / "demo", vocab_size=512)
    assert set(paths) == {"tokenizer", "docs", "code"}
    tok = Tokenizer(paths["tokenizer"])
    assert tok.vocab_size == 512
    docs = TokenStream(paths["docs"])
    topics = doc_topics()
    assert docs.num_docs == len(topics) > 50
    assert docs.read(0, docs.doc_ends(0, docs.num_tokens)[0]).tolist() == tok.encode(topics[0]) + [tok.eos_id]
    code = TokenStream(paths["code"])
    assert code.num_tokens > 100_000
    manifest = json.loads((tmp_path / "demo" / "manifest.json").read_text())
    assert manifest["sources"]["code"]["tokens"] == code.num_tokens

    # a second call reuses the cache: not a file is rewritten (no timing: a wall-time bound flakes on a busy machine)
    before = _mtimes(tmp_path / "demo")
    assert prepare_demo_data(tmp_path / "demo", vocab_size=512) == paths
    assert _mtimes(tmp_path / "demo") == before

    # an interrupted preparation (no manifest) is redone, with the same result
    os.remove(tmp_path / "demo" / "manifest.json")
    assert prepare_demo_data(tmp_path / "demo", vocab_size=512) == paths
    assert TokenStream(paths["code"]).read(0, 1000).tolist() == code.read(0, 1000).tolist()
    expected = [".lock", "code", "docs", "manifest.json", "tokenizer.model", "tokenizer.vocab"]
    assert sorted(os.listdir(tmp_path / "demo")) == expected  # no staging folder left behind
