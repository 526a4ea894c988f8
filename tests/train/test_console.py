"""What an operator sees: step lines without a terminal, the progress bar on one, train.log, the start-up banner,
--dry-run units and resume point, profiler traces, and a second Ctrl-C aborting without a save."""

from __future__ import annotations

import io
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from internlm.train.cli import load_phases, main
from internlm.train.lr_schedule import warmup_cosine_lr
from internlm.train.metrics import MetricsLogger, format_bytes, format_count, format_duration
from internlm.train.start_point import resume_point_text
from train_utils import REPO, read_metrics, write_base, write_phase

STEPS = 6
LOG_EVERY = 2


def _train_cmd(config, *sets):
    return [sys.executable, os.path.join(REPO, "train.py"), "--config", config, "--set", *sets]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)


def test_units():
    assert [format_count(n) for n in (950, 614_400, 999_999, 4.19e6, 1.3e9, 104.74e9, 1600.01e9)] == [
        "950",
        "614.40k",
        "1.00M",
        "4.19M",
        "1.30B",
        "104.74B",
        "1,600.01B",
    ]
    assert [format_bytes(n) for n in (512, 97.3 * 2**20, 1.25 * 2**30, 3 * 2**40)] == [
        "512 B",
        "97.3 MiB",
        "1.2 GiB",
        "3.0 TiB",
    ]
    assert [format_duration(s) for s in (0.42, 42, 192, 5 * 3600 + 7 * 60, 12 * 86400 + 4 * 3600)] == [
        "0.4 s",
        "42 s",
        "3m12s",
        "5h07m",
        "12d04h",
    ]


def test_progress_bar_on_a_terminal_and_plain_lines_otherwise(tmp_path, monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(shutil, "get_terminal_size", lambda fallback=None: os.terminal_size((60, 24)))
    bar = MetricsLogger(str(tmp_path / "tty"), enabled=True, tensorboard=False, console=True)
    bar.step("p1 step 1/4 (global 1/8)", "loss 2.0000 | " + "x" * 100, 1, 8)
    bar.message("saved checkpoint")
    bar.close()
    text = out.getvalue()
    assert text.startswith("\rp1 step 1/4 (global 1/8) [#...........] loss 2.0000")
    assert "\r\x1b[Ksaved checkpoint\n" in text and all(len(line) < 60 + 6 for line in re.split("[\r\n]", text))
    out.truncate(0)
    out.seek(0)
    plain = MetricsLogger(str(tmp_path / "plain"), enabled=True, tensorboard=False, console=False)
    plain.step("p1 step 1/4 (global 1/8)", "loss 2.0", 1, 8, show=False)
    plain.step("p1 step 2/4 (global 2/8)", "loss 1.0", 2, 8, show=True)
    plain.close()
    assert out.getvalue() == "p1 step 2/4 (global 2/8) loss 1.0\n"
    with open(tmp_path / "plain" / "train.log") as f:
        assert len(f.read().splitlines()) == 2  # every step in train.log


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory, demo_data):
    """Six steps with log_every=2, stdout a pipe (as under nohup or Slurm), steps 2..3 profiled."""
    tmp = tmp_path_factory.mktemp("console")
    work_dir = str(tmp / "run")
    folder = str(tmp / "cfg")
    write_base(folder, demo_data, work_dir)
    config = write_phase(folder, "p1", "")
    sets = [
        f"data.total_steps={STEPS}",
        f"monitor.log_every={LOG_EVERY}",
        "profile.start_step=2",
        "profile.end_step=3",
        "profile.memory=True",
    ]
    proc = subprocess.run(_train_cmd(config, *sets), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(work_dir, "train.log")) as f:
        log = f.read()
    return SimpleNamespace(out=proc.stdout, log=log, work_dir=work_dir, config=config)


def test_plain_step_lines_every_log_every(piped_run):
    out = piped_run.out
    assert "\r" not in out and "\x1b" not in out
    steps = [line for line in out.splitlines() if re.match(r"p1 step \d+/", line)]
    assert [line.split()[2] for line in steps] == ["2/6", "4/6", "6/6"]
    for line, step in zip(steps, (2, 4, 6)):
        assert f"(global {step}/6)" in line
        for field in ("ETA ", "loss ", "lr ", "grad ", "TFLOPS", "MFU ", "rss ", "MiB", "skipped 0", " tokens"):
            assert field in line, (field, line)
    assert out.count("done: step 6") == 1


def test_banner(piped_run):
    lines = piped_run.out.splitlines()
    banner = "\n".join(lines[:6])
    assert lines[0].startswith("InternLM pretraining: ") and "parameters" in lines[0]
    assert "float32" in lines[0] and "attention sdpa" in lines[0]
    assert "CPU (1 thread per process)" in banner
    assert "tp1 x pp1 x dp1 (zero1 1, 1 chunk, 1 rank)" in banner
    assert piped_run.work_dir in banner and "from scratch" in banner
    assert "rank = tp_rank" not in piped_run.out  # the rank formula and groups: only with several processes


def test_train_log(piped_run):
    log = piped_run.log.splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", line) for line in log if not line.startswith("  "))
    steps = [line for line in log if " p1 step " in line]
    assert [line.split(" p1 step ")[1].split()[0] for line in steps] == [f"{i}/6" for i in range(1, 7)]
    assert any("warning: profile.memory" in line for line in log)
    assert any("saved checkpoint" in line for line in log)
    records = read_metrics(piped_run.work_dir)
    final = f" done: step 6, 1.54k tokens, last loss {[r for r in records if 'loss' in r][-1]['loss']:.4f}"
    valid = [r["val_loss"] for r in records if "val_loss" in r]
    if valid:  # the phase's last step validates when there are validation batches
        final += f", last validation loss {valid[-1]:.4f}"
    assert log[-1].endswith(final), (log[-1], final)
    assert "InternLM pretraining" in piped_run.log


def test_memory_in_metrics(piped_run):
    records = [r for r in read_metrics(piped_run.work_dir) if "loss" in r]
    with_memory = [r["step"] for r in records if "mem_rss_gib" in r]
    assert 2 in with_memory and 4 in with_memory and 6 in with_memory and 1 not in with_memory
    assert all(0 < r["mem_rss_gib"] < 64 for r in records if "mem_rss_gib" in r)


def test_peak_rss_is_this_process_not_the_parent_that_started_it():
    # Linux keeps getrusage's ru_maxrss across execve: a train.py started by a large parent (here this test
    # process after touching 1 GiB) read the parent's peak (a console line showed "rss 2.6 GiB" for a tiny run)
    ballast = bytearray(2**30)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    code = "from internlm.train.metrics import peak_rss_bytes; print(peak_rss_bytes())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    del ballast
    assert 0 < int(child.stdout) < 2**30 * 0.75, child.stdout


def test_lr_and_beta2_in_metrics_follow_the_schedule(piped_run):
    # the tiny base config: adam.lr 2e-3, lr_scheduler warmup_ratio 0.2 and eta_min 2e-4 over the phase's 6 steps
    # (round(1.2) = 1 warm-up update), adam_beta2 0.95 with no beta2 schedule
    records = [r for r in read_metrics(piped_run.work_dir) if "loss" in r]
    assert [r["lr"] for r in records] == [warmup_cosine_lr(step, STEPS, 2e-3, 0.2, 2e-4) for step in range(STEPS)]
    assert records[0]["lr"] == 2e-3 and records[-1]["lr"] == pytest.approx(2e-4, rel=1e-12)
    assert {r["beta2"] for r in records} == {0.95}


def test_profile_trace(piped_run):
    folder = os.path.join(piped_run.work_dir, "profile")
    assert os.listdir(folder) == ["trace_rank0_steps2-3.pt.trace.json"]
    with open(os.path.join(folder, "trace_rank0_steps2-3.pt.trace.json")) as f:
        trace = json.load(f)
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"step 2", "step 3"} <= names and "step 4" not in names
    assert "profiling steps 2..3" in piped_run.out


def test_resume_point_text(piped_run, tmp_path):
    _, phases = load_phases(["--config", piped_run.config, "--set", f"data.total_steps={STEPS}"])
    text, index = resume_point_text(phases)
    checkpoint = os.path.join(piped_run.work_dir, "checkpoints", "6")
    assert (text, index) == (f"checkpoint {checkpoint} (step 6): all 1 phase(s) are complete, nothing to do", 1)
    root = str(tmp_path / "checkpoints")
    shutil.copytree(os.path.join(piped_run.work_dir, "checkpoints", "3"), os.path.join(root, "3"))
    sets = [f"data.total_steps={STEPS}", f"ckpt.save_ckpt_folder={root}"]
    text, index = resume_point_text(load_phases(["--config", piped_run.config, "--set", *sets])[1])
    expected = f"resumes from checkpoint {root}/3 (step 3): phase 1 'p1' step 4 (global step 4)"
    assert (text, index) == (expected, 0)
    # a newer checkpoint with a missing file: the line names the one the run will resume from, not the newest
    # (the dry run checks sizes; training passes what it verified: the same text)
    shutil.copytree(os.path.join(piped_run.work_dir, "checkpoints", "6"), os.path.join(root, "6"))
    os.remove(os.path.join(root, "6", "model_tp0_pp0.pt"))
    phases = load_phases(["--config", piped_run.config, "--set", *sets])[1]
    skipped = expected + "; 1 newer checkpoint(s) damaged and skipped (warning below)"
    assert resume_point_text(phases) == (skipped, 0)
    assert resume_point_text(phases, (f"{root}/3", 1)) == (skipped, 0)


def test_dry_run_units(tmp_path, capsys):
    assert (
        main(["--config", os.path.join(REPO, "configs", "demo.py"), "--dry-run", "--set", f"work_dir={tmp_path}"]) == 0
    )
    out = capsys.readouterr().out
    assert "model: 4.00M parameters" in out and "0.00B" not in out and "0.0 GiB" not in out
    assert "= 819.20k tokens (2.05k tokens/step" in out
    assert re.search(r"memory per device: [\d.]+ MiB \(weights [\d.]+ MiB", out)
    assert "optimizer state fresh" in out and "carried over" not in out
    assert f"start: from scratch (no checkpoint in {tmp_path}/checkpoints)" in out
    assert "start-up estimate:" in out and "total: 819.20k tokens in " in out
    phases = [os.path.join(REPO, "configs", "demo", name) for name in ("phase1.py", "phase2.py")]
    assert main(["--config", *phases, "--dry-run", "--set", f"work_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert out.count("optimizer state fresh") == 1 and out.count("optimizer state carried over") == 1


def test_second_ctrl_c_aborts_without_saving(tmp_path, demo_data):
    """The first Ctrl-C promises a save after the step; a second one within the step aborts: no checkpoint,
    exit status 130, one line saying so."""
    work_dir = str(tmp_path / "run")
    config = write_base(str(tmp_path / "cfg"), demo_data, work_dir)
    # steps long enough (about a second here) for the second signal to arrive inside the step
    sets = ["data.total_steps=400", "model.hidden_size=256", "data.seq_len=128", "data.micro_bsz=8"]
    proc = subprocess.Popen(
        _train_cmd(config, *sets), cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines: "queue.Queue[str]" = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
    reader.start()
    seen = []

    def read_until(prefix):
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            seen.append(line)
            if re.match(prefix, line):
                return
        raise AssertionError(f"no line matching {prefix!r}:\n" + "".join(seen))

    try:
        read_until(r"base step 2/")  # a step line is printed as the next step starts: interrupt step 3
        proc.send_signal(signal.SIGINT)
        read_until("Ctrl-C")
        proc.send_signal(signal.SIGINT)
        returncode = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    while not lines.empty():
        seen.append(lines.get())
    out, err = "".join(seen), proc.stderr.read()
    assert returncode == 130, out[-2000:] + err[-2000:]
    assert "press again to abort without saving" in out
    aborted = [line for line in out.splitlines() if line.startswith("aborted")]
    assert aborted == [
        "aborted by Ctrl-C during step 3: nothing saved; a rerun resumes from the last complete checkpoint"
    ]
    assert "Traceback" not in err and "stopped after" not in out
    checkpoints = os.path.join(work_dir, "checkpoints")
    assert not os.path.isdir(checkpoints) or not [n for n in os.listdir(checkpoints) if n.isdigit()]
    with open(os.path.join(work_dir, "train.log")) as f:
        assert f.read().rstrip().endswith(aborted[0])


def test_cpu_threads_shared_among_local_processes(monkeypatch):
    import torch

    from internlm.train.run import _set_cpu_threads, cpu_threads

    assert cpu_threads(1) >= 1 and cpu_threads(10**6) == 1
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's default: replaced
        torch.set_num_threads(7)
        _set_cpu_threads()
        assert torch.get_num_threads() == cpu_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's: kept
        torch.set_num_threads(7)
        _set_cpu_threads()
        assert torch.get_num_threads() == 7
    finally:
        torch.set_num_threads(before)
