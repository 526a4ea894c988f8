"""Shared by the evaluation tests: small task files from the demo corpus and one tiny single-process run that
evaluates them (its checkpoint also serves the lm-eval tests)."""

import json
import os
import random

import pytest

from internlm.data.demo_corpus import doc_topics
from internlm.evaluation.demo_tasks import next_line_items
from train_utils import run_train, write_base

STEPS = 3


def write_tasks(folder: str) -> dict:
    """``{"mc": 10 next-line items, "ppl": 3 texts}`` (jsonl paths) from the demo corpus's documentation topics."""
    os.makedirs(folder, exist_ok=True)
    docs = doc_topics()[-40:]
    paths = dict(mc=os.path.join(folder, "mc.jsonl"), ppl=os.path.join(folder, "ppl.jsonl"))
    with open(paths["mc"], "w") as f:
        for item in next_line_items(docs, random.Random(1), 10):
            f.write(json.dumps(item) + "\n")
    with open(paths["ppl"], "w") as f:
        for doc in docs[:3]:
            f.write(json.dumps(dict(text=doc[:600])) + "\n")
    return paths


def evaluation_sets(tasks: dict, every: int) -> list:
    spec = [
        dict(name="mc", kind="multiple_choice", path=tasks["mc"]),
        dict(name="ppl", kind="perplexity", path=tasks["ppl"]),
    ]
    return [f"evaluation.every={every}", f"evaluation.tasks={json.dumps(spec)}"]


def train_run(root, demo, nproc: int, sets: list) -> str:
    """A tiny run of STEPS steps under ``sets``; returns its work_dir."""
    work_dir = str(root / "run")
    config = write_base(str(root / "cfg"), demo, work_dir)
    run_train([config], nproc=nproc, sets=[f"data.total_steps={STEPS}", "ckpt.checkpoint_every=100", *sets])
    return work_dir


@pytest.fixture(scope="session")
def eval_tasks(tmp_path_factory):
    return write_tasks(str(tmp_path_factory.mktemp("eval_tasks")))


@pytest.fixture(scope="session")
def single_eval_run(tmp_path_factory, demo_data, eval_tasks):
    """One process, evaluating at step 0 and every step."""
    return train_run(tmp_path_factory.mktemp("eval_single"), demo_data, 1, evaluation_sets(eval_tasks, 1))
