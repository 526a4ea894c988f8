"""Helpers for end-to-end training tests: tiny configs on the demo corpus, reading metrics back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_BASE = """
JOB_NAME = "test"
work_dir = {work_dir!r}
seed = 7
model = dict(hidden_size=64, num_layers=4, num_attention_heads=4, num_kv_attention_heads=2, multiple_of=32,
             vocab_size=2048, dtype="torch.float32", attn_backend="sdpa")
parallel = dict(tensor=1, pipeline=dict(size=1), zero1=-1, sequence_parallel=False)
data = dict(seq_len=32, micro_bsz=2, micro_num=4, total_steps=6, valid_every=0, valid_max_samples=8,
            valid_micro_num=2, tokenizer_path={tokenizer!r},
            train_folder={{{docs!r}: 0.7, {code!r}: 0.3}})
adam = dict(lr=2e-3, weight_decay=0.01)
lr_scheduler = dict(warmup_ratio=0.2, eta_min=2e-4)
ckpt = dict(checkpoint_every=3, keep_last=5, stop_file_path={stop!r})
monitor = dict(tensorboard=False, peak_tflops=1.0)
"""


class Webhook:
    """An HTTP server on 127.0.0.1 (a free port) keeping the JSON bodies POSTed to it: what an alert webhook
    receives. ``url``, ``bodies``, ``events()``; ``close()`` stops it (the ``webhook`` fixture does)."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        bodies: List[dict] = []
        self.bodies = bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> List[str]:
        return [body["event"] for body in self.bodies]

    def close(self) -> None:
        self.server.shutdown()


def main_in_process(args: List[str]) -> tuple:
    """``train.py ARGS`` as ``cli.main(args)`` in this process: (exit status, stdout, stderr); the SIGINT / SIGTERM
    handlers the run installs are restored afterwards."""
    import io
    import signal
    from contextlib import redirect_stderr, redirect_stdout

    from internlm.train.cli import main

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            status = main(args)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return status, out.getvalue(), err.getvalue()


def write_base(folder: str, demo: Dict[str, str], work_dir: str) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "base.py")
    with open(path, "w") as f:
        f.write(
            TINY_BASE.format(
                work_dir=work_dir,
                tokenizer=demo["tokenizer"],
                docs=demo["docs"],
                code=demo["code"],
                stop=os.path.join(work_dir, "STOP"),
            )
        )
    return path


def copy_run(work_dir: str, folder: str, demo: Dict[str, str]) -> tuple:
    """A copy of a finished run's ``work_dir`` under ``folder`` and a base config pointing at the copy: (work_dir,
    config). For tests that resume, damage or rerun the shared `reference_run` (conftest) without changing it."""
    copy = os.path.join(folder, "work")
    shutil.copytree(work_dir, copy)
    return copy, write_base(os.path.join(folder, "cfg"), demo, copy)


def write_phase(folder: str, name: str, body: str) -> str:
    path = os.path.join(folder, f"{name}.py")
    with open(path, "w") as f:
        f.write(f'_base_ = "base.py"\nphase = dict(name={name!r})\n{body}\n')
    return path


def request_stop(work_dir: str, after_step: int) -> None:
    os.makedirs(work_dir, exist_ok=True)
    with open(os.path.join(work_dir, "STOP"), "w") as f:
        f.write(str(after_step))


def read_metrics(work_dir: str) -> List[dict]:
    with open(os.path.join(work_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def step_losses(work_dir: str) -> Dict[int, float]:
    """Loss per global step (a resumed run's lines replace nothing: each step is logged once)."""
    out: Dict[int, float] = {}
    for record in read_metrics(work_dir):
        if "loss" in record:
            assert record["step"] not in out, f"step {record['step']} logged twice"
            out[record["step"]] = record["loss"]
    return out


def demo_cwd(folder: str, demo: Dict[str, str]) -> str:
    """A working directory for commands that use the shipped demo configs (their data is ``data_cache/demo``,
    relative to the working directory): ``folder/data_cache/demo`` links to the session's demo corpus, so nothing
    is built in, or read from, the checkout's data_cache."""
    link = os.path.join(folder, "data_cache", "demo")
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink(os.path.dirname(demo["docs"]), link)
    return folder


def run_train(
    configs: List[str],
    nproc: int = 1,
    sets: Optional[List[str]] = None,
    timeout: int = 300,
    expect: int = 0,
    cwd: str = REPO,
):
    """Run train.py as a user would (torchrun for several processes); returns the CompletedProcess, checking its
    exit status is ``expect`` (e.g. 75 after a stop file: internlm.train.run.EXIT_STOPPED). torchrun exits 1 for
    any non-zero worker status and names the worker's in its summary (``exitcode  : 75``): that is checked then.
    The status rank 0 writes to ``$INTERNLM_EXIT_STATUS_FILE`` must be ``expect`` too (unless killed: < 0)."""
    if nproc == 1:
        cmd = [sys.executable, os.path.join(REPO, "train.py")]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            os.path.join(REPO, "train.py"),
        ]
    cmd += ["--config", *configs]
    if sets:
        cmd += ["--set", *sets]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    with tempfile.TemporaryDirectory() as tmp:
        status_file = os.path.join(tmp, "exit_status")  # rank 0 writes its status there (internlm.train.cli)
        env["INTERNLM_EXIT_STATUS_FILE"] = status_file
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        recorded = int(open(status_file).read()) if os.path.exists(status_file) else None
    if expect < 0:  # killed by a signal: nothing recorded
        recorded = expect
    ok = proc.returncode == expect and recorded == expect
    if expect and nproc > 1:
        ok = proc.returncode == 1 and f"exitcode  : {expect} " in proc.stderr and recorded == expect
    said = f"train.py exited {proc.returncode} (recorded status {recorded}), not {expect}"
    assert ok, f"{said}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def relative_distance(tensor, reference) -> float:
    """``||tensor - reference|| / ||reference||`` in float64 (NaN when either holds a NaN): how far a layout's final
    parameters are from the reference run's, as a fraction of the tensor. Layout comparisons use it per tensor and not
    per element: Adam turns summation-order noise in a near-zero gradient into a full +-lr step on that element."""
    reference = reference.double()
    return float((tensor.double() - reference).norm() / reference.norm().clamp(min=1e-12))
