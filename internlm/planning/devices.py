"""Devices: one table of dense bf16 peaks (the denominator of MFU) and, for the planner, memory and link speeds.

``peak_tflops(device, override)`` returns, in order: ``override`` (``monitor.peak_tflops``) when set; for a CUDA
device the table's figure for its exact name (``torch.cuda.get_device_name``); else None, and the trainer logs
``mfu: null``. A CPU has no published figure: set ``monitor.peak_tflops`` for one (`probe_cpu_tflops` measures
the machine's fp32 matmul rate, a probe that reads low on a loaded machine, so it is never used implicitly).
Unknown GPUs return None rather than a guess: a wrong denominator makes MFU look better or worse than it is.

Figures are the vendors' dense bf16 tensor-core peaks (half the "with sparsity" figure of the data sheets) at
boost clock; SXM and PCIe/NVL versions of one chip differ by clock and power, so each name maps to its own.
Rows with a planner name (``tools/plan.py --device-type``) also give the memory the driver reports (nvidia-smi
total) and the effective per-GPU bus bandwidths of NCCL collectives inside a node and across nodes (assumed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch


@dataclass(frozen=True)
class Device:
    """One device model: exact CUDA names, dense bf16 peak; for the planner (``name`` set) memory and links."""

    cuda_names: Tuple[str, ...]  # as torch.cuda.get_device_name reports them
    peak_tflops: float  # dense bf16 tensor-core peak
    name: str = ""  # the planner's --device-type, "" when the planner does not offer it
    memory_gib: float = 0.0  # what the driver reports (nvidia-smi total)
    intra_bw: float = 0.0  # GB/s, effective per-GPU collective bandwidth inside a node
    inter_bw: float = 0.0  # GB/s, effective per-GPU bandwidth across nodes
    links: str = ""


_NVLINK4 = "NVLink 4 (900 GB/s both ways), 400 Gb/s NIC per GPU"
_NVLINK3 = "NVLink 3 (600 GB/s both ways), 200 Gb/s NIC per GPU"

TABLE: Tuple[Device, ...] = (
    # NVIDIA Hopper
    Device(("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM5 80GB"), 989.0, "h100-sxm", 81559 / 1024, 360.0, 40.0, _NVLINK4),
    Device(("NVIDIA H100 PCIe",), 756.0, "h100-pcie", 81559 / 1024, 40.0, 20.0, "PCIe Gen5 x16, 200 Gb/s NIC per GPU"),
    Device(("NVIDIA H100 NVL",), 835.0),
    Device(("NVIDIA H200",), 989.0, "h200", 143771 / 1024, 360.0, 40.0, _NVLINK4),  # H200 SXM
    Device(("NVIDIA H200 NVL",), 835.0),
    Device(("NVIDIA GH200 480GB", "NVIDIA GH200 144G HBM3e"), 989.0),
    Device(("NVIDIA H800",), 989.0),  # H800 SXM5
    Device(("NVIDIA H800 PCIe",), 756.0),
    Device(("NVIDIA H20",), 148.0),
    # NVIDIA Ampere
    Device(("NVIDIA A100-SXM4-80GB",), 312.0, "a100-80gb", 81920 / 1024, 230.0, 20.0, _NVLINK3),
    Device(("NVIDIA A100-SXM4-40GB",), 312.0, "a100-40gb", 40960 / 1024, 230.0, 20.0, _NVLINK3),
    Device(("NVIDIA A100-PCIE-40GB", "NVIDIA A100 80GB PCIe"), 312.0),
    Device(("NVIDIA A800-SXM4-80GB", "NVIDIA A800-SXM4-40GB", "NVIDIA A800 80GB PCIe"), 312.0),
    Device(("NVIDIA A40",), 150.0),
    Device(("NVIDIA A10",), 125.0),
    # NVIDIA Ada
    Device(
        ("NVIDIA L40S",), 362.0, "l40s", 46068 / 1024, 20.0, 10.0, "PCIe Gen4 x16 (no NVLink), 100 Gb/s NIC per GPU"
    ),
    Device(("NVIDIA L40",), 181.0),
    Device(("NVIDIA L4",), 121.0),
    # NVIDIA Blackwell
    Device(("NVIDIA B200",), 2250.0),
    # AMD Instinct (ROCm builds report them through torch.cuda)
    Device(("AMD Instinct MI300X",), 1307.0),
    Device(("AMD Instinct MI250X",), 383.0),
)

# exact names as torch.cuda.get_device_name reports them -> dense bf16 TFLOP/s
PEAK_TFLOPS: Dict[str, float] = {name: d.peak_tflops for d in TABLE for name in d.cuda_names}

# the planner's device types (tools/plan.py --device-type)
PLANNER_DEVICES: Dict[str, Device] = {d.name: d for d in TABLE if d.name}


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


__all__ = [
    "Device",
    "TABLE",
    "PEAK_TFLOPS",
    "PLANNER_DEVICES",
    "peak_tflops",
    "peak_tflops_of_name",
    "probe_cpu_tflops",
]
