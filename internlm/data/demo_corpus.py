"""A small real corpus that ships with Python itself, for demos and tests.

Two sources: ``docs`` holds the standard library's documentation topics (``pydoc_data.topics``, one
document per topic) and ``code`` a deterministic set of standard-library modules (top-level ``.py``
files in sorted order until about 1 MB). A byte-fallback SentencePiece model is trained on both and
each source is tokenized into its own data folder.

Preparation runs once per cache folder: ``manifest.json`` is written last, so an interrupted run has
no manifest and is redone; a file lock serialises concurrent callers (e.g. several ranks).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from typing import Dict, List

from .tokenize_corpus import tokenize_to_shards
from .tokenizer import train_sentencepiece

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
CODE_BYTES = 1_000_000
_ITEMS = ("tokenizer.model", "tokenizer.vocab", "docs", "code")


def doc_topics() -> List[str]:
    """One document per pydoc topic, in sorted topic order."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def stdlib_modules(max_bytes: int = CODE_BYTES) -> List[str]:
    """Source of top-level standard-library modules in sorted file order, stopping once ``max_bytes`` is reached."""
    lib = sysconfig.get_paths()["stdlib"]
    texts, total = [], 0
    for name in sorted(n for n in os.listdir(lib) if n.endswith(".py")):
        with open(os.path.join(lib, name), "rb") as f:
            raw = f.read()
        texts.append(raw.decode("utf-8", errors="replace"))
        total += len(raw)
        if total >= max_bytes:
            break
    return texts


def _result(cache_dir: str, manifest: Dict) -> Dict[str, str]:
    return {key: os.path.join(cache_dir, manifest[key]) for key in ("tokenizer", "docs", "code")}


def _load_manifest(cache_dir: str, vocab_size: int):
    path = os.path.join(cache_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("version") != MANIFEST_VERSION or manifest.get("vocab_size") != vocab_size:
        return None
    if not all(os.path.exists(p) for p in _result(cache_dir, manifest).values()):
        return None
    return manifest


def _write_jsonl(path: str, texts: List[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")


def _build(cache_dir: str, vocab_size: int) -> Dict:
    stage = tempfile.mkdtemp(prefix=".stage-", dir=cache_dir)
    try:
        raw = {"docs": doc_topics(), "code": stdlib_modules()}
        model = train_sentencepiece(raw["docs"] + raw["code"], os.path.join(stage, "tokenizer"), vocab_size)
        counts = {}
        for name, texts in raw.items():
            jsonl = os.path.join(stage, f"{name}.jsonl")
            _write_jsonl(jsonl, texts)
            info = tokenize_to_shards([jsonl], model, os.path.join(stage, name), shard_tokens=100_000, progress=False)
            counts[name] = {"documents": info["num_docs"], "tokens": info["num_tokens"]}
            os.remove(jsonl)
        for item in _ITEMS:  # move into place; a crash here leaves no manifest, so the next call rebuilds
            target = os.path.join(cache_dir, item)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(os.path.join(stage, item), target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    manifest = {
        "version": MANIFEST_VERSION,
        "vocab_size": vocab_size,
        "python": sys.version.split()[0],
        "tokenizer": os.path.basename(model),
        "docs": "docs",
        "code": "code",
        "sources": counts,
    }
    tmp = os.path.join(cache_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, os.path.join(cache_dir, MANIFEST))
    return manifest


def prepare_demo_data(cache_dir: str, vocab_size: int = 2048) -> Dict[str, str]:
    """Build (first call) or reuse the demo corpus in ``cache_dir``.

    Returns ``{"tokenizer": .model path, "docs": data folder, "code": data folder}``. A cache built
    with another ``vocab_size`` is rebuilt.
    """
    cache_dir = os.path.abspath(os.fspath(cache_dir))
    manifest = _load_manifest(cache_dir, vocab_size)
    if manifest is not None:
        return _result(cache_dir, manifest)
    os.makedirs(cache_dir, exist_ok=True)
    with open(os.path.join(cache_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = _load_manifest(cache_dir, vocab_size)  # another process may have finished meanwhile
        if manifest is None:
            stale = os.path.join(cache_dir, MANIFEST)
            if os.path.exists(stale):
                os.remove(stale)
            manifest = _build(cache_dir, vocab_size)
    return _result(cache_dir, manifest)
