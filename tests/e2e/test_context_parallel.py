"""Context parallelism trains like one process (issue 18, acceptance 1).

`train.py` under torchrun (gloo, CPU) with the tiny GQA model (4 heads, 2 kv heads) on packed documents of a
synthetic corpus whose documents are 2 to 90 tokens long: packed 64-token windows hold several documents, whose
boundaries fall inside the context ranks' chunks, and documents longer than a rank's share (checked on the data
below). 3 fp32 steps, the same global batch as the single-process run; per-step losses and grad norms, and the
validation loss after step 3, within 1e-4 relative; recomputation (context 4) and both pipeline schedules
included. `RESUMED` also stops after step 2 and resumes: its step 3 equals its uninterrupted run's bit for bit; its
step-2 checkpoint, resumed by one process (resharded across context sizes), gives one process's step 3 (1e-4).
"""

import shutil

import numpy as np
import pytest

from internlm.config import load_run_config
from internlm.data import build_train_loader
from internlm.data.shard import ShardWriter
from internlm.train.run import EXIT_STOPPED
from train_utils import read_metrics, request_stop, run_train, write_base

STEPS = 3

# one 64-token window per micro-batch: a 2-rank share is 32 tokens, shorter than the longest documents
BATCH = ["data.seq_len=64", "data.micro_bsz=1", "data.valid_every=3"]
# name: (processes, overrides). data.micro_num keeps the global batch at 4 sequences of 64 tokens.
LAYOUTS = {
    "cp2_ring": (2, ["parallel.context=2"]),
    "cp4_ring_recompute": (4, ["parallel.context=4", "model.checkpoint=True"]),
    "cp2_a2a": (2, ["parallel.context=2", "parallel.context_mode=a2a"]),
    "cp2_tp2_sp": (4, ["parallel.context=2", "parallel.tensor=2", "parallel.sequence_parallel=True"]),
    "cp2_pp2_1f1b": (4, ["parallel.context=2", "parallel.pipeline.size=2"]),
    "cp2_pp2_interleaved": (4, ["parallel.context=2", "parallel.pipeline.size=2", "model.num_chunks=2"]),
    "cp2_dp2_zero1": (4, ["parallel.context=2", "parallel.zero1=2", "data.micro_num=2"]),
}
RESUMED = "cp2_ring"


def _write_corpus(folder, seed: int) -> str:
    """One shard of 120 documents of random tokens: lengths 2-12 and 40-90 mixed."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    lengths = np.where(rng.random(120) < 0.6, rng.integers(2, 13, 120), rng.integers(40, 91, 120))
    tokens = rng.integers(3, 2048, int(lengths.sum()))
    tokens[np.cumsum(lengths) - 1] = 2  # every document ends in EOS
    writer = ShardWriter(str(folder / "docs.bin"), vocab_size=2048, eos_id=2)
    writer.add(tokens, lengths)
    writer.close()
    return str(folder)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, demo_data):
    root = tmp_path_factory.mktemp("cp_corpus")
    return dict(demo_data, docs=_write_corpus(root / "a", 1), code=_write_corpus(root / "b", 2))


def _losses(work_dir):
    """Per step the training record, under key "valid" the validation loss."""
    records = read_metrics(work_dir)
    out = {r["step"]: r for r in records if "loss" in r}
    out["valid"] = [r["val_loss"] for r in records if "val_loss" in r]
    return out


def _train(root, demo, nproc, sets, stop_after=None):
    """Train under ``sets``; with ``stop_after``, stop after that step first (and leave a copy of the stopped run in
    ``root / "copy"``), then rerun the same command."""
    work_dir = str(root / "run")
    config = write_base(str(root / "cfg"), demo, work_dir)
    sets = [f"data.total_steps={STEPS}", "ckpt.checkpoint_every=100", *BATCH, *sets]
    if stop_after is not None:
        request_stop(work_dir, after_step=stop_after)
        run_train([config], nproc=nproc, sets=sets, timeout=600, expect=EXIT_STOPPED)
        shutil.copytree(work_dir, str(root / "copy"))
    run_train([config], nproc=nproc, sets=sets, timeout=600)
    return _losses(work_dir), config


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    return _train(tmp_path_factory.mktemp("single"), corpus, 1, [])


def test_packed_documents_cross_the_context_shards(reference):
    """The data the equivalence runs see: documents end inside the chunks of 4 ring ranks (8 tokens) and a document
    runs longer than a rank's share of a 2-rank split (32 tokens)."""
    _, config = reference
    run = load_run_config(config, BATCH)
    batch = next(iter(build_train_loader(run.data, run.seed, 0, 1)))
    chunk = run.data.seq_len // 8
    inner, longest = 0, 0
    for mb in batch:
        bounds = mb["cu_seqlens_list"]
        inner += sum(1 for b in bounds[1:-1] if b % chunk)
        longest = max(longest, max(y - x for x, y in zip(bounds[:-1], bounds[1:])))
    assert inner > 0 and longest > run.data.micro_bsz * run.data.seq_len // 2, (inner, longest)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_context_parallel_matches_single_process(layout, reference, tmp_path_factory, corpus):
    nproc, sets = LAYOUTS[layout]
    ref, _ = reference
    train, _ = _train(tmp_path_factory.mktemp(layout), corpus, nproc, sets)
    valid = train.pop("valid")
    assert sorted(train) == list(range(1, STEPS + 1))
    assert len(valid) == len(ref["valid"]) == 1 and abs(valid[0] - ref["valid"][0]) <= 1e-4 * ref["valid"][0]
    for step in train:
        for key in ("loss", "grad_norm"):
            a, b = ref[step][key], train[step][key]
            assert abs(a - b) <= 1e-4 * abs(a), (layout, step, key, a, b)
    if layout == RESUMED:  # stop after step 2, resume with the same command: step 3 as uninterrupted
        root = tmp_path_factory.mktemp(layout + "_resumed")
        resumed, _ = _train(root, corpus, nproc, sets, stop_after=2)
        resumed.pop("valid")
        assert sorted(resumed) == list(range(1, STEPS + 1))
        for step in resumed:
            a, b = train[step]["loss"], resumed[step]["loss"]
            assert a == b, (step, a, b)  # bit-exact, as every resume of this project
        # the step-2 checkpoint of context 2 resumed by one process: resharded (weights do not depend on C)
        copy = str(root / "copy")
        config = write_base(str(root / "cfg_copy"), corpus, copy)
        out = run_train([config], sets=[f"data.total_steps={STEPS}", "ckpt.checkpoint_every=100", *BATCH])
        assert "resharded checkpoint from tp1 x cp2-ring x pp1 x dp1" in out.stdout
        a, b = ref[STEPS]["loss"], _losses(copy)[STEPS]["loss"]
        assert abs(a - b) <= 1e-4 * abs(a), (a, b)
