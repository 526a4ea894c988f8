"""The benchmark scripts run end to end (``benchmarks/gpu_check.py --smoke``), and the MFU peak table."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from internlm.planning import devices
from train_utils import REPO


def test_gpu_check_smoke_prints_the_table():
    pytest.importorskip("transformers")
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "gpu_check.py"), "--smoke"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = [line for line in lines if line.startswith("| variant")]
    assert header and all(k in header[0] for k in ("tokens/s", "TFLOP/s", "MFU", "peak GiB")), proc.stdout
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ") and "---" not in line}
    for variant in ("eager", "fused", "compiled", "transformers"):
        assert variant in rows and "failed" not in rows[variant] and "skipped" not in rows[variant], proc.stdout
    # every variant started from the same weights: equal first-step losses (fp32 on the CPU). Printed to 6 decimals,
    # all four were the same (6.264585) on 2026-12-07; fp32 summation order moves a loss by ~1e-7 relative, a wrong
    # loss (a token too many or too few in the mean, a mis-scaled head) by 1e-3 or more. (The former 1e-3 absolute
    # on 4 printed decimals let such a bug through.)
    losses = {float(rows[v].split("|")[6]) for v in ("eager", "fused", "compiled", "transformers")}
    assert max(losses) - min(losses) <= 1e-5 * min(losses), proc.stdout


def test_peak_tflops_by_exact_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert devices.peak_tflops(torch.device("cuda", 0)) == 989.0
    for name, value in [
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100-PCIE-40GB", 312.0),
        ("NVIDIA A800-SXM4-80GB", 312.0),
        ("NVIDIA H800", 989.0),
        ("NVIDIA L40S", 362.0),
    ]:
        assert devices.peak_tflops_of_name(name) == value, name
    # an unknown card is not guessed (the trainer logs mfu: null), a near-miss name neither
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3060")
    assert devices.peak_tflops("cuda") is None
    assert devices.peak_tflops_of_name("NVIDIA H100") is None
    assert devices.peak_tflops("cuda", override=500) == 500.0


def test_cpu_peak_comes_from_the_config_only():
    assert devices.peak_tflops(torch.device("cpu")) is None
    assert devices.peak_tflops("cpu", override=1.5) == 1.5
    assert devices.probe_cpu_tflops(seconds=0.01, size=64) > 0  # a measurement offered separately, never implied
