"""End-to-end (train.py, one process): a run whose data folder moved resumes with the same batches; data changed
under a checkpoint stops the resume with one line (exit 2)."""

import os
import shutil

from internlm.train.run import EXIT_STOPPED
from train_utils import request_stop, run_train, step_losses, write_base

EXIT_BAD_INPUT = 2


def _same_losses(a, b):
    assert sorted(a) == sorted(b)
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6 * abs(a[step]), (step, a[step], b[step])


def _config(folder, demo, data_root, work_dir):
    """The tiny base config with the demo's two sources under ``data_root``."""
    return write_base(folder, dict(demo, docs=f"{data_root}/docs", code=f"{data_root}/code"), work_dir)


def test_moved_data_resumes_exactly_and_changed_data_stops(tmp_path, demo_data):
    old_root, new_root = str(tmp_path / "mount_a" / "corpus"), str(tmp_path / "mount_b" / "moved")
    for name in ("docs", "code"):
        shutil.copytree(demo_data[name], os.path.join(old_root, name))
    ref_dir, cut_dir = str(tmp_path / "ref"), str(tmp_path / "cut")
    run_train([_config(str(tmp_path / "cfg_ref"), demo_data, old_root, ref_dir)])

    request_stop(cut_dir, after_step=3)
    run_train([_config(str(tmp_path / "cfg_cut"), demo_data, old_root, cut_dir)], expect=EXIT_STOPPED)
    os.makedirs(os.path.dirname(new_root))
    os.rename(old_root, new_root)  # the data moved to another mount; the config follows it
    moved_cfg = _config(str(tmp_path / "cfg_cut"), demo_data, new_root, cut_dir)

    # a shard added to a source between the runs: named in one line, exit 2, nothing trained
    docs = os.path.join(new_root, "docs")
    first = sorted(n for n in os.listdir(docs) if n.endswith(".bin"))[0]
    for suffix in ("", ".meta"):
        shutil.copy(os.path.join(docs, first + suffix), os.path.join(docs, "added_00000.bin" + suffix))
    out = run_train([moved_cfg], expect=EXIT_BAD_INPUT)
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("error:")]
    assert f"source {docs}: added added_00000.bin" in line and "data.accept_changed_data=True" in line, line
    print(line)
    assert sorted(step_losses(cut_dir)) == [1, 2, 3]

    for suffix in ("", ".meta"):
        os.remove(os.path.join(docs, "added_00000.bin" + suffix))
    out = run_train([moved_cfg])
    assert "resumed from" in out.stdout and "warning" not in out.stdout
    _same_losses(step_losses(ref_dir), step_losses(cut_dir))


WORDS = "the a data model token stream batch step loss train order shard file resume epoch seed".split()


def _raw_corpus(root):
    """Two sources of jsonl documents (one gzip-compressed, one of two files)."""
    import gzip
    import json
    import random

    rng = random.Random(0)
    docs = lambda n: [json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(5, 80)))}) + "\n" for _ in range(n)]  # noqa: E731
    os.makedirs(os.path.join(root, "docs"))
    os.makedirs(os.path.join(root, "code"))
    with gzip.open(os.path.join(root, "docs", "part0.jsonl.gz"), "wt") as f:
        f.writelines(docs(160))
    for part in range(2):
        with open(os.path.join(root, "code", f"part{part}.jsonl"), "w") as f:
            f.writelines(docs(40))


def test_streaming_resumes_exactly_with_the_losses_of_the_tokenized_route(tmp_path, demo_data):
    import subprocess
    import sys

    from train_utils import REPO, write_phase

    raw, tok = str(tmp_path / "raw"), str(tmp_path / "tok")
    _raw_corpus(raw)
    for name in ("docs", "code"):
        cmd = [sys.executable, os.path.join(REPO, "tools", "tokenizer.py"), "--input", os.path.join(raw, name)]
        cmd += ["--tokenizer", demo_data["tokenizer"], "--output", os.path.join(tok, name), "--no-progress"]
        subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True)

    ref_dir, cut_dir = str(tmp_path / "ref"), str(tmp_path / "cut")
    _config(str(tmp_path / "cfg_ref"), demo_data, tok, ref_dir)
    run_train([write_phase(str(tmp_path / "cfg_ref"), "p", "data = dict(valid_ratio=0)")])
    _config(str(tmp_path / "cfg_cut"), demo_data, raw, cut_dir)
    streaming = write_phase(str(tmp_path / "cfg_cut"), "p", 'data = dict(type="streaming", valid_ratio=0)')
    request_stop(cut_dir, after_step=3)
    run_train([streaming], expect=EXIT_STOPPED)
    out = run_train([streaming])
    assert "resumed from" in out.stdout
    _same_losses(step_losses(ref_dir), step_losses(cut_dir))
