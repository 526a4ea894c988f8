"""The demo's tasks, built from text the demo never trains on: the held-out tail (``data.valid_ratio``) of each
training source of the demo corpus (`internlm.data.demo_corpus`), decoded back to text.

* ``next_line.jsonl`` (multiple choice): the previous `CONTEXT_LINES` lines of a held-out document, and the true
  next line among `CHOICES` - 1 distractors, other held-out lines of the same source (chance 1 / `CHOICES`);
* ``heldout_<source>.jsonl`` (perplexity): the held-out documents of each source.

The files are a function of the corpus alone (a fixed seed), written atomically, so every rank may build them.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any, Dict, List

from internlm.data import Tokenizer
from internlm.data.loader import open_train_sources

CONTEXT_LINES = 3
CHOICES = 4
MIN_LINE_CHARS = 12  # shorter lines (blank, "    else:", "]") are neither asked nor used as distractors
ITEMS_PER_SOURCE = 100
PPL_CHARS_PER_SOURCE = 8_000


def heldout_documents(data: Any, tokenizer: Tokenizer) -> Dict[str, List[str]]:
    """``{source name: held-out document texts}``: each source's tokens from its training end, cut at document
    ends and decoded (the first piece may be the tail of a document that started in the training part)."""
    sources, _ = open_train_sources(data)
    out = {}
    for source in sources:
        stream, start = source.stream, source.train_end
        tokens = stream.read(start, stream.num_tokens)
        cuts = [0] + [int(e) - start for e in stream.doc_ends(start, stream.num_tokens)]
        docs = [tokenizer.decode(t for t in tokens[a:b] if t != tokenizer.eos_id) for a, b in zip(cuts, cuts[1:])]
        out[os.path.basename(os.path.normpath(source.key))] = [d for d in docs if d.strip()]
    return out


def next_line_items(docs: List[str], rng: random.Random, limit: int) -> List[Dict[str, Any]]:
    """Multiple-choice items over ``docs`` (see the module docstring), at most ``limit``, in document order."""
    pool = sorted({line for doc in docs for line in doc.split("\n") if len(line.strip()) >= MIN_LINE_CHARS})
    candidates = []
    for doc in docs:
        lines = doc.split("\n")
        for i in range(CONTEXT_LINES, len(lines)):
            if len(lines[i].strip()) >= MIN_LINE_CHARS and all(lines[i - k].strip() for k in range(1, 3)):
                candidates.append(("\n".join(lines[i - CONTEXT_LINES : i]) + "\n", lines[i]))
    if len(pool) < CHOICES or not candidates:
        return []
    rng.shuffle(candidates)
    items = []
    for context, answer in candidates[:limit]:
        distractors: List[str] = []
        while len(distractors) < CHOICES - 1:
            line = rng.choice(pool)
            if line != answer and line not in distractors:
                distractors.append(line)
        choices = [answer] + distractors
        rng.shuffle(choices)
        items.append(dict(context=context, choices=choices, gold=choices.index(answer)))
    return items


def _write(path: str, records: List[Dict[str, Any]]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def build_demo_tasks(folder: str, data: Any) -> List[str]:
    """Write the demo tasks of ``data`` (a data section with tokenizer_path and valid_ratio) into ``folder``;
    returns the files written (``next_line.jsonl``, then ``heldout_<source>.jsonl`` per source)."""
    if data.valid_folder is not None or not data.valid_ratio:
        raise ValueError("evaluation.prepare_demo_tasks needs data.valid_ratio > 0 (the held-out tail it reads)")
    os.makedirs(folder, exist_ok=True)
    documents = heldout_documents(data, Tokenizer(data.tokenizer_path))
    rng = random.Random(0)
    items: List[Dict[str, Any]] = []
    written = []
    for name in sorted(documents):
        items += next_line_items(documents[name], rng, ITEMS_PER_SOURCE)
        texts, total = [], 0
        for doc in documents[name]:
            if total >= PPL_CHARS_PER_SOURCE:
                break
            texts.append(dict(text=doc[: PPL_CHARS_PER_SOURCE - total]))
            total += len(texts[-1]["text"])
        path = os.path.join(folder, f"heldout_{name}.jsonl")
        _write(path, texts)
        written.append(path)
    path = os.path.join(folder, "next_line.jsonl")
    _write(path, items)
    return [path] + written


__all__ = ["build_demo_tasks", "heldout_documents", "next_line_items"]
