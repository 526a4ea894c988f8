"""Which implementation a kernel call runs: the Triton kernels or the eager (pure torch) reference.

Policy ``auto`` (the default) picks Triton when every tensor of the call is on

* a CUDA device and ``triton`` imports, or
* the CPU, ``TRITON_INTERPRET=1`` is set *and* Triton's interpreter works in this process (the variable must have
  been set when ``triton`` was first imported: Triton decides interpreted vs compiled when a function is decorated;
  a one-off probe launch checks it),

and the eager path otherwise (no triton, other devices, meta tensors). Each op also falls back to eager for
dtypes or shapes its kernel does not take (e.g. float64, which `torch.autograd.gradcheck` uses).

Policy ``eager`` always runs the reference; ``triton`` raises where Triton cannot run. Set it with
`set_backend`, the `kernel_backend` context manager, or the environment variable ``INTERNLM_KERNELS``.
`CALLS` counts the (op, backend) pairs that ran, so tests can check which path was taken.

Triton is imported lazily, on the first call that could use it, so importing this package never imports triton.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import os
from typing import Any, Dict, Iterator, Optional

import torch

BACKENDS = ("auto", "eager", "triton")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CALLS: Dict[tuple, int] = collections.Counter()

_forced: Optional[str] = None
_cache: Dict[str, Any] = {}


def set_backend(name: Optional[str]) -> None:
    """Force ``"eager"`` or ``"triton"``; ``"auto"`` or None goes back to ``INTERNLM_KERNELS`` (default auto)."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {name!r}")
    _forced = None if name == "auto" else name


@contextlib.contextmanager
def kernel_backend(name: str) -> Iterator[None]:
    """``with kernel_backend("eager"): ...`` runs the block under that policy, then restores the previous one."""
    previous = _forced
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def current_backend() -> str:
    name = _forced or os.environ.get("INTERNLM_KERNELS", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"INTERNLM_KERNELS must be one of {BACKENDS}, got {name!r}")
    return name


def interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def load_triton() -> Optional[Any]:
    """Import the Triton kernels (`internlm.kernels._triton`) once; None when triton is unavailable."""
    if "module" not in _cache:
        try:
            _cache["module"] = importlib.import_module("internlm.kernels._triton")
            _cache["why"] = ""
        except Exception as exc:  # ImportError, or a triton build that does not load
            _cache["module"], _cache["why"] = None, f"triton unavailable: {type(exc).__name__}: {exc}"
    return _cache["module"]


def _interpreter_works() -> bool:
    if "interpreter" not in _cache:
        module = load_triton()
        ok, why = False, _cache["why"]
        if module is not None:
            try:
                ok = module.probe()
                why = "" if ok else "the Triton interpreter probe returned wrong values"
            except Exception as exc:
                why = (
                    f"the Triton interpreter does not run here ({type(exc).__name__}); set TRITON_INTERPRET=1 "
                    "before triton is first imported in the process"
                )
        _cache["interpreter"], _cache["interpreter_why"] = ok, why
    return _cache["interpreter"]


def triton_unavailable_reason(device: torch.device) -> str:
    """Empty when Triton kernels can run on ``device`` under the auto policy, else why not."""
    device = torch.device(device)
    if device.type == "cuda":
        return "" if load_triton() is not None else _cache["why"]
    if device.type == "cpu":
        if not interpret_requested():
            return "CPU tensors use Triton only with TRITON_INTERPRET=1"
        return "" if _interpreter_works() else _cache["interpreter_why"]
    return f"no Triton path for device type {device.type!r}"


def use_triton(op: str, *tensors: torch.Tensor, supported: bool = True) -> bool:
    """Decide the backend of one call of ``op`` on ``tensors`` and count it in `CALLS`.

    ``supported``: whether the kernel takes these dtypes/shapes (the op checks); False means eager.
    """
    policy = current_backend()
    choice = False
    if policy != "eager" and supported:
        devices = {t.device for t in tensors}
        reason = "tensors on several devices" if len(devices) != 1 else triton_unavailable_reason(devices.pop())
        if policy == "triton" and reason:
            raise RuntimeError(f"{op}: kernel backend 'triton' was forced but {reason}")
        choice = not reason
    CALLS[(op, "triton" if choice else "eager")] += 1
    return choice


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The compute dtype of the eager paths: float32, or float64 for float64 inputs (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


__all__ = [
    "BACKENDS",
    "CALLS",
    "TRITON_DTYPES",
    "acc_dtype",
    "current_backend",
    "interpret_requested",
    "kernel_backend",
    "load_triton",
    "set_backend",
    "triton_unavailable_reason",
    "use_triton",
]
