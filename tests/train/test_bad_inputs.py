"""Every bad input of issue 11 (cases 2-12): exit status 2, one line naming the file or key and what to do, no
traceback, printed once under torchrun, and nothing in the work_dir, checkpoints or data deleted or changed.

Most checks run at start-up, before a model is built: those cases call `cli.main` in this process (no torch
start-up per case); the others run train.py as a user would.
"""

import hashlib
import os
import shutil
import subprocess
import sys

import pytest

from internlm.checkpoint import complete_checkpoints
from internlm.train.lock import LOCK_FILE
from train_utils import REPO, main_in_process, run_train, step_losses, write_base


def _snapshot(*folders):
    """``{path: sha256}`` of every file under ``folders`` (train.log excluded: a failed run logs its error)."""
    out = {}
    for folder in folders:
        for root, _, files in os.walk(folder):
            for name in files:
                if name != "train.log":
                    path = os.path.join(root, name)
                    with open(path, "rb") as f:
                        out[path] = hashlib.sha256(f.read()).hexdigest()
    return out


def _assert_one_line_error(stderr, *fragments):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def trained(reference_run):
    """A finished 6-step run (checkpoints at steps 3 and 6) and its losses: the session's shared reference run
    (tests copy it before changing it)."""
    return reference_run.work_dir, dict(reference_run.losses)


def _copy_run(trained, tmp_path, demo_data):
    """A copy of the trained work_dir and a config pointing at it."""
    work_dir = str(tmp_path / "work")
    shutil.copytree(trained[0], work_dir)
    return work_dir, write_base(str(tmp_path / "cfg"), demo_data, work_dir)


def _fresh(tmp_path, demo_data):
    work_dir = str(tmp_path / "work")
    os.makedirs(work_dir)
    return work_dir, write_base(str(tmp_path / "cfg"), demo_data, work_dir)


def _flip_bytes(path, count=64):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        data = f.read(count)
        f.seek(os.path.getsize(path) // 2)
        f.write(bytes(b ^ 0xFF for b in data))


def test_2_overwritten_optimizer_bytes_with_no_checkpoint_left(trained, tmp_path, demo_data):
    """Bytes overwritten in the only checkpoint's optimizer file: named, exit 2, nothing moved or changed (the
    fallback to an older complete checkpoint is test_checkpoint.py's damaged-newest test)."""
    work_dir, cfg = _copy_run(trained, tmp_path, demo_data)
    shutil.move(os.path.join(work_dir, "checkpoints", "3"), str(tmp_path / "moved_away"))
    optim = os.path.join(work_dir, "checkpoints", "6", "optim_tp0_pp0_dp0.pt")
    _flip_bytes(optim)
    before = _snapshot(work_dir)
    proc = run_train([cfg], expect=2)
    _assert_one_line_error(proc.stderr, "no usable checkpoint", "optim_tp0_pp0_dp0.pt fails its checksum")
    assert "Traceback" not in proc.stdout
    # found when the trainer verifies checksums (spread over the ranks), after it dumped this run's config
    # (config_base.py: the same bytes for the same command; this copy's work_dir differs)
    changed = {path for path, digest in _snapshot(work_dir).items() if before.get(path) != digest}
    assert changed == {os.path.join(work_dir, "config_base.py")} and set(_snapshot(work_dir)) == set(before)


def test_3_checkpoint_folder_without_meta_json(trained, tmp_path, demo_data):
    work_dir, cfg = _copy_run(trained, tmp_path, demo_data)
    newest = os.path.join(work_dir, "checkpoints", "6")
    os.remove(os.path.join(newest, "meta.json"))
    before = _snapshot(work_dir, demo_data["docs"])
    status, _, err = main_in_process(["--config", cfg])
    assert status == 2
    _assert_one_line_error(err, f"checkpoint folder {newest} holds files", "no meta.json", "move the folder out")
    assert _snapshot(work_dir, demo_data["docs"]) == before


def test_4_second_run_on_a_locked_work_dir_and_a_stale_lock(trained, tmp_path, demo_data):
    work_dir, cfg = _copy_run(trained, tmp_path, demo_data)
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from internlm.train.lock import WorkDirLock\nWorkDirLock({work_dir!r}).acquire()\n"
         "print('held', flush=True)\nimport time\ntime.sleep(60)"],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _snapshot(work_dir)
        status, _, err = main_in_process(["--config", cfg])
        assert status == 2
        _assert_one_line_error(
            err, f"work_dir {work_dir!r} is in use by another run", f"pid {holder.pid} on host", ", started 20"
        )
        assert _snapshot(work_dir) == before
        assert main_in_process(["--config", cfg, "--dry-run"])[0] == 0  # --dry-run takes no lock
    finally:
        holder.kill()
        holder.wait()
    # the killed holder left its lock file: stale (flock free, pid gone), taken over with a note
    assert os.path.isfile(os.path.join(work_dir, LOCK_FILE))
    status, out, _ = main_in_process(["--config", cfg])
    assert status == 0 and f"stale lock in {os.path.join(work_dir, LOCK_FILE)}: pid {holder.pid}" in out
    assert not os.path.exists(os.path.join(work_dir, LOCK_FILE))  # released on exit


def test_5_half_written_last_metrics_line_is_dropped_on_resume(trained, tmp_path, demo_data):
    work_dir, cfg = _copy_run(trained, tmp_path, demo_data)
    metrics = os.path.join(work_dir, "metrics.jsonl")
    with open(metrics) as f:
        complete = f.read()
    with open(metrics, "a") as f:
        f.write('{"step": 7, "loss": 7.1')  # a kill or a full disk in the middle of an append
    status, out, err = main_in_process(["--config", cfg])
    assert status == 0, err
    assert f"warning: {metrics}: the last line is not complete JSON" in out and "dropped" in out
    with open(metrics) as f:
        assert f.read() == complete


def _damage_data(kind, folder):
    """Damage a copy of a shard folder as ``kind`` says; returns the file (or folder) the error must name."""
    bin_path = os.path.join(folder, "shard_00000.bin")
    meta = bin_path + ".meta"
    if kind == "missing folder":
        shutil.rmtree(folder)
        return folder
    if kind == "empty folder":
        for name in os.listdir(folder):
            os.remove(os.path.join(folder, name))
        return folder
    if kind == "truncated shard":
        os.truncate(bin_path, os.path.getsize(bin_path) - 10)
        return bin_path
    if kind == "missing meta":
        os.remove(meta)
        return meta
    if kind == "corrupt meta header":
        with open(meta, "r+b") as f:
            f.seek(16)
            f.write(b"\xff{{{")
        return meta
    assert kind == "short document table"
    os.truncate(meta, os.path.getsize(meta) - 16)
    return meta


@pytest.mark.parametrize(
    "kind",
    [
        "missing folder",
        "empty folder",
        "truncated shard",
        "missing meta",
        "corrupt meta header",
        "short document table",
    ],
)
def test_6_data_errors_name_the_file(kind, tmp_path, demo_data):
    data = dict(demo_data, docs=str(tmp_path / "docs"))
    shutil.copytree(demo_data["docs"], data["docs"])
    named = _damage_data(kind, data["docs"])
    work_dir, cfg = _fresh(tmp_path, data)
    before = _snapshot(work_dir, str(tmp_path / "docs"))
    status, _, err = main_in_process(["--config", cfg])
    assert status == 2
    _assert_one_line_error(err, "data.train_folder", named)
    assert _snapshot(work_dir, str(tmp_path / "docs")) == before and os.listdir(work_dir) == []


def test_6_data_error_under_torchrun_is_printed_once_without_traceback(tmp_path, demo_data):
    data = dict(demo_data, docs=str(tmp_path / "docs"))
    shutil.copytree(demo_data["docs"], data["docs"])
    named = _damage_data("short document table", data["docs"])
    _, cfg = _fresh(tmp_path, data)
    proc = run_train([cfg], nproc=2, expect=2)
    errors = [line for line in proc.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1 and named in errors[0], proc.stderr
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr


def test_7_model_vocab_smaller_than_the_shards(tmp_path, demo_data):
    work_dir, cfg = _fresh(tmp_path, demo_data)
    status, _, err = main_in_process(["--config", cfg, "--set", "model.vocab_size=1000"])
    assert status == 2
    _assert_one_line_error(err, "model.vocab_size: 1000 is smaller than the vocabulary", "(2048, recorded in")
    assert os.listdir(work_dir) == []


def test_8_seq_len_above_max_position_embeddings(tmp_path, demo_data):
    _, cfg = _fresh(tmp_path, demo_data)
    status, _, err = main_in_process(["--config", cfg, "--set", "data.seq_len=64", "model.max_position_embeddings=48"])
    assert status == 2
    _assert_one_line_error(err, "data.seq_len: 64 exceeds model.max_position_embeddings=48")
    assert (
        main_in_process(["--config", cfg, "--dry-run", "--set", "data.seq_len=64", "model.max_position_embeddings=48"])[
            0
        ]
        == 2
    )


def test_9_tokenizer_not_a_sentencepiece_model(tmp_path, demo_data):
    work_dir, cfg = _fresh(tmp_path, demo_data)
    status, _, err = main_in_process(["--config", cfg, "--set", f"data.tokenizer_path={cfg}"])
    assert status == 2
    _assert_one_line_error(err, "data.tokenizer_path", f"{cfg!r} is not a SentencePiece model")
    assert os.listdir(work_dir) == []


def test_9_a_failing_final_sample_does_not_fail_a_finished_run(trained, tmp_path, demo_data, monkeypatch):
    _, cfg = _copy_run(trained, tmp_path, demo_data)

    import internlm.model

    def broken(*args, **kwargs):
        raise RuntimeError("sampling broke")

    monkeypatch.setattr(internlm.model, "generate", broken)
    status, out, err = main_in_process(["--config", cfg])
    assert status == 0 and "nothing to do" in out
    assert "warning: no sample printed (RuntimeError: sampling broke)" in err


@pytest.mark.parametrize("damage", ["truncated file", "empty meta.json"])
def test_10_damaged_newest_checkpoint_is_named_skipped_and_the_previous_used(damage, trained, tmp_path, demo_data):
    work_dir, cfg = _copy_run(trained, tmp_path, demo_data)
    newest = os.path.join(work_dir, "checkpoints", "6")
    if damage == "truncated file":
        model = os.path.join(newest, "model_tp0_pp0.pt")
        os.truncate(model, os.path.getsize(model) // 2)
        report = "model_tp0_pp0.pt has"
    else:
        open(os.path.join(newest, "meta.json"), "w").close()
        report = "meta.json cannot be read"
    proc = run_train([cfg])
    assert f"checkpoint {newest} is damaged: {report}" in proc.stdout
    assert f"resumed from {os.path.join(work_dir, 'checkpoints', '3')} (step 3" in proc.stdout
    assert step_losses(work_dir) == pytest.approx(trained[1], rel=1e-6)
    assert os.path.isdir(newest + ".damaged") and complete_checkpoints(os.path.join(work_dir, "checkpoints")) == [3, 6]


def test_11_checkpoint_of_another_model_shape(trained, tmp_path, demo_data):
    work_dir, cfg = _copy_run(trained, tmp_path, demo_data)
    before = _snapshot(work_dir)
    status, out, err = main_in_process(["--config", cfg, "--set", "model.hidden_size=128", "model.num_layers=2"])
    assert status == 2
    newest = os.path.join(work_dir, "checkpoints", "6")
    _assert_one_line_error(
        err,
        f"checkpoint {newest}",
        "holds another model",
        "hidden_size 64 (this run: 128)",
        "num_layers 4 (this run: 2)",
    )
    assert "phase" not in out  # no misleading "phase changed" warning
    assert _snapshot(work_dir) == before


def test_12_unwritable_checkpoint_folder_and_too_little_disk(tmp_path, demo_data):
    work_dir, cfg = _fresh(tmp_path, demo_data)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    status, _, err = main_in_process(["--config", cfg, "--set", f"ckpt.save_ckpt_folder={blocker}/checkpoints"])
    assert status == 2
    _assert_one_line_error(err, "ckpt.save_ckpt_folder", f"{blocker} is a file, not a folder")
    if os.geteuid() != 0:  # root writes anywhere: the permission case needs another user
        locked = tmp_path / "read_only"
        locked.mkdir(mode=0o555)
        status, _, err = main_in_process(["--config", cfg, "--set", f"ckpt.save_ckpt_folder={locked}/checkpoints"])
        assert status == 2
        _assert_one_line_error(err, "ckpt.save_ckpt_folder", "is not writable")
    # a model whose checkpoint (weights + fp32 optimizer state, ~48 TiB) no disk here holds; nothing is built
    huge = ["model.hidden_size=32768", "model.num_layers=256", "model.num_attention_heads=256"]
    status, _, err = main_in_process(["--config", cfg, "--set", *huge, "model.num_kv_attention_heads=256"])
    assert status == 2
    _assert_one_line_error(err, "ckpt.save_ckpt_folder", "free but one checkpoint of this model takes about")
    assert os.listdir(work_dir) == []
