"""Task files and their tokenized requests.

A multiple-choice file holds one JSON object per line::

    {"context": "The capital of France is", "choices": [" Paris", " Rome", " Berlin"], "gold": 0}

Each choice is scored as the continuation of the context (the choice string is appended as it is: put any
separating space in the choices). A perplexity file holds ``{"text": "..."}`` per line.

Tokenization follows lm-evaluation-harness's rule for a (context, continuation) pair, so that the in-loop scores
and the harness's agree: trailing spaces of the context move to the continuation; the continuation's tokens are
those of ``encode(context + continuation)`` after the first ``len(encode(context))``; an empty context becomes
the EOS token.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence, Tuple

Encode = Callable[[str], List[int]]
FEWSHOT_SEPARATOR = "\n\n"  # between few-shot examples and before the scored item


class TaskFileError(ValueError):
    """A task file that cannot be read: the message is one line naming the file and the line."""


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice item: its context, choices (strings) and the index of the right one."""

    context: str
    choices: Tuple[str, ...]
    gold: int


def _read_jsonl(path: str) -> List[Dict[str, Any]]:
    if not os.path.isfile(path):
        raise TaskFileError(f"{path}: task file not found (evaluation.tasks[].path)")
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise TaskFileError(f"{path}:{number}: not JSON ({exc})") from None
            if not isinstance(record, dict):
                raise TaskFileError(f"{path}:{number}: expected a JSON object")
            out.append(record)
    return out


def read_choice_items(path: str) -> List[ChoiceItem]:
    """The items of a multiple-choice jsonl file (``context``, ``choices``, ``gold``), checked."""
    items = []
    for number, record in enumerate(_read_jsonl(path), 1):
        context, choices, gold = record.get("context"), record.get("choices"), record.get("gold")
        if not isinstance(context, str) or not isinstance(choices, list) or len(choices) < 2:
            raise TaskFileError(f"{path}: item {number} needs a string 'context' and a list of >= 2 'choices'")
        if not all(isinstance(c, str) and c for c in choices):
            raise TaskFileError(f"{path}: item {number}: every choice must be a non-empty string")
        if not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise TaskFileError(
                f"{path}: item {number}: 'gold' must be an index into 'choices' (0..{len(choices) - 1})"
            )
        items.append(ChoiceItem(context, tuple(choices), gold))
    if not items:
        raise TaskFileError(f"{path}: no item")
    return items


def read_texts(path: str) -> List[str]:
    """The texts of a perplexity jsonl file (``text`` per line)."""
    texts = []
    for number, record in enumerate(_read_jsonl(path), 1):
        text = record.get("text")
        if not isinstance(text, str) or not text:
            raise TaskFileError(f"{path}: line {number} needs a non-empty string 'text'")
        texts.append(text)
    if not texts:
        raise TaskFileError(f"{path}: no text")
    return texts


def encode_pair(encode: Encode, eos_id: int, context: str, continuation: str) -> Tuple[List[int], List[int]]:
    """``(context ids, continuation ids)`` by the rule of the module docstring (lm-eval's ``_encode_pair``)."""
    if not context:
        return [eos_id], encode(continuation)
    stripped = context.rstrip(" ")
    if len(stripped) != len(context):
        continuation = context[len(stripped) :] + continuation
        context = stripped
    whole = encode(context + continuation)
    context_ids = encode(context)
    return context_ids, whole[len(context_ids) :]


def fewshot_prefix(shots: Sequence[ChoiceItem]) -> str:
    """The few-shot examples as text: each context with its right choice, then `FEWSHOT_SEPARATOR`."""
    return "".join(s.context + s.choices[s.gold] + FEWSHOT_SEPARATOR for s in shots)


def choice_task_items(task: Dict[str, Any]) -> Tuple[List[ChoiceItem], str]:
    """The scored items of a multiple-choice task dict (evaluation.tasks) and its few-shot prefix: the first
    ``num_fewshot`` items of ``fewshot_path`` (or of ``path``, which are then not scored), then ``limit``."""
    items = read_choice_items(task["path"])
    shots: List[ChoiceItem] = []
    if task["num_fewshot"]:
        if task["fewshot_path"]:
            shots = read_choice_items(task["fewshot_path"])[: task["num_fewshot"]]
        else:
            shots, items = items[: task["num_fewshot"]], items[task["num_fewshot"] :]
        if not items:
            raise TaskFileError(f"{task['path']}: no item left to score after {task['num_fewshot']} few-shot examples")
    if task["limit"] is not None:
        items = items[: task["limit"]]
    return items, fewshot_prefix(shots)


def text_task_texts(task: Dict[str, Any]) -> List[str]:
    """The texts of a perplexity task dict, cut to ``limit``."""
    texts = read_texts(task["path"])
    return texts if task["limit"] is None else texts[: task["limit"]]


__all__ = [
    "ChoiceItem",
    "FEWSHOT_SEPARATOR",
    "TaskFileError",
    "choice_task_items",
    "encode_pair",
    "fewshot_prefix",
    "read_choice_items",
    "read_texts",
    "text_task_texts",
]
