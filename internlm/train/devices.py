"""Peak throughput of a device, the denominator of MFU: dense (no sparsity) bf16 TFLOP/s by exact device name.

``peak_tflops(device, override)`` returns, in order: ``override`` (``monitor.peak_tflops``) when set; for a CUDA
device the table's figure for its exact name (``torch.cuda.get_device_name``); else None, and the trainer logs
``mfu: null``. A CPU has no published figure: set ``monitor.peak_tflops`` for one (`probe_cpu_tflops` measures
the machine's fp32 matmul rate, a probe that reads low on a loaded machine, so it is never used implicitly).
Unknown GPUs return None rather than a guess: a wrong denominator makes MFU look better or worse than it is.

Figures are the vendors' dense bf16 tensor-core peaks (half the "with sparsity" figure of the data sheets) at
boost clock; SXM and PCIe/NVL versions of one chip differ by clock and power, so each name maps to its own.
"""

from __future__ import annotations

import time
from typing import Dict, Optional, Union

import torch

# exact names as torch.cuda.get_device_name reports them -> dense bf16 TFLOP/s
PEAK_TFLOPS: Dict[str, float] = {
    # NVIDIA Hopper
    "NVIDIA H100 80GB HBM3": 989.0,  # H100 SXM5
    "NVIDIA H100 SXM5 80GB": 989.0,
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0,  # H200 SXM
    "NVIDIA H200 NVL": 835.0,
    "NVIDIA GH200 480GB": 989.0,
    "NVIDIA GH200 144G HBM3e": 989.0,
    "NVIDIA H800": 989.0,  # H800 SXM5
    "NVIDIA H800 PCIe": 756.0,
    "NVIDIA H20": 148.0,
    # NVIDIA Ampere
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A800-SXM4-80GB": 312.0,
    "NVIDIA A800-SXM4-40GB": 312.0,
    "NVIDIA A800 80GB PCIe": 312.0,
    "NVIDIA A40": 150.0,
    "NVIDIA A10": 125.0,
    # NVIDIA Ada
    "NVIDIA L40S": 362.0,
    "NVIDIA L40": 181.0,
    "NVIDIA L4": 121.0,
    # NVIDIA Blackwell
    "NVIDIA B200": 2250.0,
    # AMD Instinct (ROCm builds report them through torch.cuda)
    "AMD Instinct MI300X": 1307.0,
    "AMD Instinct MI250X": 383.0,
}


def _key(name: str) -> str:
    return " ".join(name.split()).lower()


_BY_KEY = {_key(name): value for name, value in PEAK_TFLOPS.items()}


def peak_tflops_of_name(name: str) -> Optional[float]:
    """The table's dense bf16 peak for the exact device ``name`` (case and spacing ignored), else None."""
    return _BY_KEY.get(_key(name))


def peak_tflops(device: Union[torch.device, str], override: Optional[float] = None) -> Optional[float]:
    """Dense bf16 peak TFLOP/s of ``device`` for MFU, or None when unknown (MFU is then not reported).

    ``override``: ``monitor.peak_tflops`` (any positive number wins). CUDA devices: `PEAK_TFLOPS` by exact name.
    CPUs and other devices: None unless overridden.
    """
    if override:
        return float(override)
    device = torch.device(device)
    if device.type == "cuda":
        return peak_tflops_of_name(torch.cuda.get_device_name(device))
    return None


def probe_cpu_tflops(seconds: float = 0.5, size: int = 1024) -> float:
    """A measurement, not a peak: the best fp32 matmul TFLOP/s of this process over ``seconds``. It reads low when
    other work shares the cores; use it to pick a ``monitor.peak_tflops`` by hand, not as a denominator."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best, deadline = 0.0, time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
        if time.perf_counter() > deadline:
            return best / 1e12


__all__ = ["PEAK_TFLOPS", "peak_tflops", "peak_tflops_of_name", "probe_cpu_tflops"]
