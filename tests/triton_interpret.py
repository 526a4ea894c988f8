"""The Triton interpreter for CPU-only test processes (see `load_kernels_interpreted`)."""

import os
import sys


def load_kernels_interpreted() -> None:
    """Without CUDA, import triton and this project's Triton kernels under TRITON_INTERPRET=1, then restore the
    variable. Triton picks interpreted vs compiled when a kernel is decorated, and the first import of triton in
    the process fixes more. tests/conftest.py calls it before collection imports test modules whose libraries
    (megatron-core) import triton themselves; tests/kernels/test_kernels.py calls it at import for the workers
    it spawns (which load no conftest). Otherwise the Triton variants find a compiled-mode triton that cannot run
    on CPU tensors and skip."""
    import importlib.util

    import torch

    if torch.cuda.is_available() or "triton" in sys.modules or importlib.util.find_spec("triton") is None:
        return
    from internlm.kernels import dispatch

    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        dispatch.load_triton()
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
