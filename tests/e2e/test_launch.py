"""Launching as on a cluster: two torchrun "nodes" meeting at a localhost rendezvous, the Slurm script, plots."""

import json
import os
import socket
import struct
import subprocess
import sys

import pytest

from train_utils import REPO, demo_cwd, read_metrics, write_base

sys.path.insert(0, os.path.join(REPO, "tools"))
import plot_metrics  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_nodes(cmd, cwd):
    """Start both "nodes" and wait for them: (return codes, outputs)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    nodes = [
        subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    return [node.returncode for node in nodes], outputs


def test_two_torchrun_nodes_on_localhost(tmp_path, demo_data):
    """Each "node" is its own torchrun with one process; they meet through the c10d rendezvous, as two hosts do.
    Run from a temporary directory (the demo config's data_cache/demo there is the session's demo corpus)."""
    work_dir = str(tmp_path / "run")
    cwd = demo_cwd(str(tmp_path / "cwd"), demo_data)
    # Two torchruns must agree on one port, so it cannot be torchrun's own pick (localhost:0): the OS gives a free
    # one, and should another process take it before the rendezvous binds it, the launch is retried on a new one.
    for _ in range(3):
        codes, outputs = _two_nodes(_two_nodes_cmd(work_dir, _free_port()), cwd)
        if codes == [0, 0] or not any("Address already in use" in out for out in outputs):
            break
    assert codes == [0, 0], "\n\n".join(o[-3000:] for o in outputs)
    assert any("done: step 3" in out for out in outputs)
    records = [r for r in read_metrics(work_dir) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    with open(os.path.join(work_dir, "checkpoints", "3", "meta.json")) as f:
        layout = json.load(f)["layout"]
    assert (layout["world_size"], layout["data"], layout["zero1"]) == (2, 2, 2)


def _two_nodes_cmd(work_dir, port):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc_per_node",
        "1",
        "--rdzv_id",
        "two-nodes",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        f"localhost:{port}",
        os.path.join(REPO, "train.py"),
        "--config",
        os.path.join(REPO, "configs", "demo.py"),
        "--set",
        "data.total_steps=3",
        "model.num_layers=2",
        "model.hidden_size=128",
        f"work_dir={work_dir}",
        "parallel.zero1=2",
    ]


def test_slurm_script_parses_and_dry_runs():
    script = os.path.join(REPO, "scripts", "slurm_train.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(
        ["bash", script, "--dry-run", "configs/internlm_7b/phase1.py"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "python train.py --config configs/internlm_7b/phase1.py --dry-run --world-size 16" in lines
    launch = lines[-1]
    assert launch.startswith("srun --kill-on-bad-exit=1 torchrun --nnodes 2 --nproc_per_node 8 --max-restarts 2")
    assert (
        "--rdzv_backend c10d --rdzv_endpoint localhost:29500 train.py --config configs/internlm_7b/phase1.py" in launch
    )
    usage = subprocess.run(["bash", script, "--dry-run"], capture_output=True, text=True, env=env)
    assert usage.returncode == 2 and "usage" in usage.stderr


@pytest.mark.parametrize("status,requeued", [(124, True), (75, True), (0, False), (2, False), (3, False)])
def test_slurm_script_requeues_resumable_ends(tmp_path, status, requeued):
    """With REQUEUE=1 the script requeues the job when train.py's own status is resumable (a fake srun plays the
    launch: it writes the trainer's status file and fails as torchrun does)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/sh\necho {status} > "$INTERNLM_EXIT_STATUS_FILE"\nexit {min(status, 1)}\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "scontrol_args"}\n')
    for name in ("srun", "scontrol"):
        os.chmod(bin_dir / name, 0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", REQUEUE="1", SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(tmp_path))
    script = os.path.join(REPO, "scripts", "slurm_train.sh")
    proc = subprocess.run(["bash", script, "configs/demo.py"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == status, proc.stderr
    args = tmp_path / "scontrol_args"
    assert args.exists() == requeued and (not requeued or args.read_text().split() == ["requeue", "4242"])


def _write_metrics(folder, phases, truncated=False):
    os.makedirs(folder, exist_ok=True)
    step = 0
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for phase, steps in phases:
            for _ in range(steps):
                step += 1
                f.write(json.dumps(dict(step=step, phase=phase, loss=8.0 / step, lr=1e-3, grad_norm=1.0, tgs=100.0)))
                f.write("\n")
            f.write(json.dumps(dict(step=step, val_loss=9.0 / step, val_loss_by_source={"data/docs": 1.0})) + "\n")
        if truncated:
            f.write('{"step": 99, "lo')


def test_plot_metrics_two_runs_with_phases(tmp_path):
    a, b = str(tmp_path / "tp2"), str(tmp_path / "pp2")
    _write_metrics(a, [("phase1", 6), ("phase2", 4)], truncated=True)
    _write_metrics(b, [("phase1", 5)])
    records = plot_metrics.read_records(a)
    assert plot_metrics.phase_starts(records) == [(1, "phase1"), (7, "phase2")]
    assert set(plot_metrics.validation_series(records)) == {"validation", "validation docs"}
    out = str(tmp_path / "plots" / "curves.png")
    assert plot_metrics.main([a, b, "--output", out]) == 0
    with open(out, "rb") as f:
        header = f.read(24)
    width, height = struct.unpack(">II", header[16:24])
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and width > 500 and height > 500
    assert plot_metrics.main([str(tmp_path / "missing"), "--output", out]) == 2


def test_demo_script_parses_and_dry_runs():
    """scripts/demo.sh --dry-run: the install command it would run, then train.py's plan of both demo phases."""
    script = os.path.join(REPO, "scripts", "demo.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.run(["bash", script, "--dry-run"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "bash scripts/install.sh"
    assert "phase1" in proc.stdout and "phase2" in proc.stdout and "start: " in proc.stdout


def test_torchrun_node_script_trains_one_node(tmp_path, demo_data):
    """scripts/torchrun_node.sh as one node of one (NNODES=1, one process): a 2-step run of the tiny config."""
    script = os.path.join(REPO, "scripts", "torchrun_node.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    work_dir = str(tmp_path / "run")
    config = write_base(str(tmp_path / "cfg"), demo_data, work_dir)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, NNODES="1", GPUS_PER_NODE="1")
    env.update(MASTER_ADDR="localhost", MASTER_PORT=str(_free_port()))
    proc = subprocess.run(
        ["bash", script, config, "--set", "data.total_steps=2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [r["step"] for r in read_metrics(work_dir) if "loss" in r] == [1, 2]
    missing = subprocess.run(["bash", script, config], capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert missing.returncode != 0 and "set NNODES" in missing.stderr
