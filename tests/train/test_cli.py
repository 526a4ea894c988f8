"""The command line as a user meets it: the demo, config errors, layout errors, --dry-run plans."""

import os
import subprocess
import sys

from train_utils import REPO, demo_cwd, read_metrics, run_train


def _train_py(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_bad_key_exits_2_with_one_line():
    proc = _train_py("--config", "configs/demo.py", "--set", "model.hiden_size=8")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "hiden_size" in lines[0] and "hidden_size" in lines[0]
    assert "Traceback" not in proc.stderr


def test_impossible_layout_exits_2_before_any_process_group():
    proc = _train_py("--config", "configs/demo.py", "--set", "parallel.tensor=3")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    proc = _train_py(
        "--config",
        "configs/demo.py",
        "--set",
        "parallel.pipeline.size=2",
        "data.micro_num=1",
        "--dry-run",
        "--world-size",
        "2",
    )
    assert proc.returncode == 2 and "data.micro_num" in proc.stderr


def test_dry_run_104b_on_2048_gpus():
    files = [f"configs/internlm_104b/phase{i}.py" for i in (1, 2, 3)]
    proc = _train_py("--config", *files, "--dry-run", "--world-size", "2048")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "104.74B parameters" in out
    assert "tensor 4 x pipeline 4 (chunks 4) x data 128" in out
    assert out.count("memory per device") == 3 and "warm-up" in out
    assert "1,600.01B tokens" in out


def test_two_phase_demo_small(tmp_path, demo_data):
    """The README's main command, shortened: both phases run, mixture and sequence length change, a sample prints.
    Run from a temporary directory whose data_cache/demo is the session's demo corpus: nothing written to the
    checkout."""
    work_dir = str(tmp_path / "demo")
    proc = run_train(
        [os.path.join(REPO, "configs", "demo", name) for name in ("phase1.py", "phase2.py")],
        cwd=demo_cwd(str(tmp_path / "cwd"), demo_data),
        sets=[
            f"work_dir={work_dir}",
            "model.num_layers=2",
            "model.hidden_size=128",
            "data.total_steps=30",
            "data.valid_every=15",
            "evaluation.every=30",  # phase 2 starts on an evaluated step: not evaluated twice
        ],
    )
    assert "sample from the trained model" in proc.stdout
    records = [r for r in read_metrics(work_dir) if "loss" in r]
    assert [r["phase"] for r in records] == ["phase1"] * 30 + ["phase2"] * 30
    assert {r["seq_len"] for r in records} == {128, 256}

    def code_share(phase):
        tokens = [r["source_tokens"] for r in records if r["phase"] == phase]
        code = sum(v for t in tokens for k, v in t.items() if k.endswith("code"))
        return code / sum(sum(t.values()) for t in tokens)

    assert abs(code_share("phase1") - 0.2) < 0.03 and abs(code_share("phase2") - 0.5) < 0.03
    assert records[-1]["loss"] < 0.8 * records[0]["loss"]
    assert os.listdir(os.path.join(work_dir, "tensorboard"))
    assert sorted(os.listdir(os.path.join(work_dir, "checkpoints"))) == ["30", "60"]
    # the demo's evaluation tasks (docs/evaluation.md): at the start and at each phase's end
    assert [r["step"] for r in read_metrics(work_dir) if "eval/next_line/acc" in r] == [0, 30, 60]
    assert proc.stdout.count("eval next_line acc") == 3
