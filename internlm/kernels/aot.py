"""Every Triton kernel of this package, with the arguments its launcher passes, for ahead-of-time compilation
(`tools/compile_kernels.py`). Imports triton: load it only where triton is wanted (the package never does).

`KERNELS` maps a kernel's name to a builder: given the shapes a model run feeds the launchers (`KernelShape`), a
storage dtype and the device's SM count, it returns the `Launch` es the launcher would make, each with the
kernel's signature, its constexprs and num_warps. Block sizes and warps come from the launchers' own choice
functions (`rms_launch`, `rotary_launch`, `swiglu_launch`, `ce_launch`), so what is compiled here is what runs.

Argument specialisation follows Triton's JIT: a pointer is assumed 16-byte aligned (torch's allocations are), an
integer equal to 1 becomes a constexpr, an integer divisible by 16 gets the ``tt.divisibility`` 16 hint, an int
fits i32 or else is i64, a float is fp32.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import _triton as rms_rotary_swiglu
from . import _triton_ce as ce
from .cross_entropy import default_chunk_tokens

POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int64: "*i64"}


@dataclass(frozen=True)
class KernelShape:
    """What one rank's launchers see in a model run: ``tokens`` of a micro-batch (all of them in attention,
    ``norm_tokens`` in the norms: tokens / tp under sequence parallelism), heads and kv heads per tensor rank,
    the MLP width per rank and the vocabulary rows per rank (chunks of ``default_chunk_tokens`` tokens)."""

    name: str
    tokens: int
    norm_tokens: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab_local: int


@dataclass(frozen=True)
class Launch:
    """One compilation: ``args`` maps each kernel argument to a torch dtype (a pointer) or a Python value."""

    kernel: str
    variant: str
    fn: Any
    args: Dict[str, Any]
    constexprs: Dict[str, Any]
    num_warps: int

    def source(self) -> ASTSource:
        signature, constexprs, attrs = dict(), dict(self.constexprs), dict()
        for index, name in enumerate(self.fn.arg_names):
            if name in self.constexprs:
                signature[name] = "constexpr"
                continue
            value = self.args[name]
            if isinstance(value, torch.dtype):
                signature[name] = POINTER_TYPES[value]
                attrs[(index,)] = [["tt.divisibility", 16]]
            elif isinstance(value, float):
                signature[name] = "fp32"
            elif value == 1:  # the JIT specialises ints equal to 1 away
                signature[name], constexprs[name] = "constexpr", 1
            else:
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[(index,)] = [["tt.divisibility", 16]]
        return ASTSource(self.fn, signature, constexprs, attrs)

    def key(self) -> Tuple:
        """Two launches with equal keys compile to the same binary."""
        return (
            self.kernel,
            repr(self.source().signature),
            repr(self.source().attrs),
            repr(self.constexprs),
            self.num_warps,
        )

    def compile(self, arch: int) -> Any:
        return triton.compile(self.source(), target=GPUTarget("cuda", arch, 32), options={"num_warps": self.num_warps})


def _rms(shape: KernelShape, dtype: torch.dtype, sm_count: int) -> List[Launch]:
    m, n = shape.norm_tokens, shape.hidden
    block_m, block_n, warps = rms_rotary_swiglu.rms_launch(n)
    meta = {"BLOCK_M": block_m, "BLOCK_N": block_n}
    fwd = {"X": dtype, "W": dtype, "Y": dtype, "RSTD": torch.float32, "M": m, "N": n, "eps": 1e-6}
    rows = rms_rotary_swiglu.rms_bwd_rows_per_program(m, block_m, sm_count)
    bwd = {"DY": dtype, "X": dtype, "W": dtype, "RSTD": torch.float32, "DX": dtype, "DW": torch.float32}
    bwd.update(M=m, N=n, rows_per_program=rows)
    return [
        Launch("_rms_fwd", "", rms_rotary_swiglu._rms_fwd, fwd, meta, warps),
        Launch("_rms_bwd", "", rms_rotary_swiglu._rms_bwd, bwd, meta, warps),
    ]


def _rotary(shape: KernelShape, dtype: torch.dtype, sm_count: int) -> List[Launch]:
    launches = []
    for heads in sorted({shape.heads, shape.kv_heads}):  # q, then k (fewer heads with GQA)
        block_h, block_d, warps = rms_rotary_swiglu.rotary_launch(heads, shape.head_dim)
        args = {"X": dtype, "COS": torch.float32, "SIN": torch.float32, "Y": dtype}
        args.update(heads=heads, half=shape.head_dim // 2)
        for inverse in (False, True):  # forward, backward
            meta = {"INVERSE": inverse, "BLOCK_H": block_h, "BLOCK_D": block_d}
            variant = f"heads={heads}{' inverse' if inverse else ''}"
            launches.append(Launch("_rotary", variant, rms_rotary_swiglu._rotary, args, meta, warps))
    return launches


def _swiglu(shape: KernelShape, dtype: torch.dtype, sm_count: int) -> List[Launch]:
    block, warps = rms_rotary_swiglu.swiglu_launch()
    n = shape.norm_tokens * shape.intermediate
    fwd = {"G": dtype, "U": dtype, "Y": dtype, "n": n}
    bwd = {"DY": dtype, "G": dtype, "U": dtype, "DG": dtype, "DU": dtype, "n": n}
    return [
        Launch("_swiglu_fwd", "", rms_rotary_swiglu._swiglu_fwd, fwd, {"BLOCK": block}, warps),
        Launch("_swiglu_bwd", "", rms_rotary_swiglu._swiglu_bwd, bwd, {"BLOCK": block}, warps),
    ]


def _cross_entropy(shape: KernelShape, dtype: torch.dtype, sm_count: int) -> List[Launch]:
    vocab = shape.vocab_local
    rows = min(default_chunk_tokens(vocab), shape.tokens)
    block, warps = ce.ce_launch(vocab)
    launches = []
    for smooth in (False, True):  # label_smoothing 0 and > 0
        args = {"LOGITS": dtype, "stride": vocab, "LABEL": torch.int64, "STATS": torch.float32}
        args.update(rows=rows, vocab=vocab)
        meta = {"BLOCK_V": block, "SMOOTH": smooth}
        launches.append(Launch("_ce_stats", f"smooth={smooth}", ce._ce_stats, args, meta, warps))
    args = {"LOGITS": dtype, "stride": vocab, "LABEL": torch.int64, "LSE": torch.float32, "SCALE": torch.float32}
    args.update(vocab=vocab, smooth_per_v=0.1 / vocab, on_label=0.9)
    launches.append(Launch("_ce_grad", "", ce._ce_grad, args, {"BLOCK_V": block}, warps))
    return launches


Builder = Callable[[KernelShape, torch.dtype, int], List[Launch]]
KERNELS: Dict[str, Builder] = {
    "_rms_fwd": _rms,
    "_rms_bwd": _rms,
    "_rotary": _rotary,
    "_swiglu_fwd": _swiglu,
    "_swiglu_bwd": _swiglu,
    "_ce_stats": _cross_entropy,
    "_ce_grad": _cross_entropy,
}
"""Every ``@triton.jit`` function of the package (tests/kernels/test_compile_kernels.py greps for new ones)."""

DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # dispatch.TRITON_DTYPES, the dtypes the kernels serve


def launches(shape: KernelShape, dtype: torch.dtype, sm_count: int) -> List[Launch]:
    """Every launch of every kernel for one shape and dtype, in `KERNELS` order, each once."""
    out, seen = [], set()
    for builder in KERNELS.values():
        if builder in seen:
            continue
        seen.add(builder)
        out.extend(builder(shape, dtype, sm_count))
    order = list(KERNELS)
    return sorted(out, key=lambda launch: order.index(launch.kernel))


@dataclass(frozen=True)
class Arch:
    """A GPU generation: compute capability, per-block shared memory limit (opt-in maximum) and SM count."""

    name: str
    capability: int
    shared_limit: int
    sm_count: int


ARCHS = (Arch("A100", 80, 163 * 1024, 108), Arch("H100", 90, 227 * 1024, 132))
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_PTXAS_PATTERNS = {
    "registers": r"Used (\d+) registers",
    "stack": r"(\d+) bytes stack frame",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "ptxas_smem": r"(\d+) bytes smem",
}


def ptxas_resources(ptx: str) -> Dict[str, int]:
    """Registers, stack frame, spill stores/loads and static shared memory (bytes) of one kernel's PTX, from
    ``ptxas -v`` (triton's bundled ``ptxas-blackwell``: the plain ``ptxas`` there is older than the PTX that
    triton emits). Compiling for a GPU needs none; a loaded kernel would report the same numbers."""
    binary = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    target = re.search(r"^\.target\s+(\w+)", ptx, re.MULTILINE).group(1)  # sm_80, sm_90a
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        done = subprocess.run(
            [binary, "-v", "--gpu-name", target, path, "-o", os.devnull], capture_output=True, text=True, check=False
        )
    if done.returncode != 0:
        raise RuntimeError(f"{binary} failed on {target}: {done.stderr.strip()[-2000:]}")
    text = done.stdout + done.stderr
    found = {key: re.search(pattern, text) for key, pattern in _PTXAS_PATTERNS.items()}
    return {key: int(match.group(1)) if match else 0 for key, match in found.items()}


def compile_rows(
    shapes: Iterable[KernelShape],
    dtypes: Iterable[torch.dtype] = DTYPES,
    archs: Iterable[Arch] = ARCHS,
    extra: Iterable[Launch] = (),
    kernels: Optional[Iterable[str]] = None,
) -> List[Dict[str, Any]]:
    """One row per kernel launch x dtype x architecture x shape: registers, stack and spills (ptxas), shared
    memory (the compiled kernel's metadata, or ptxas's static figure if larger) against the architecture's limit,
    and ``ok``. Identical launches (same signature, constexprs and warps) compile once. ``extra``: launches
    compiled for every architecture as they are (tests use it for a kernel that must fail)."""
    wanted = None if kernels is None else set(kernels)
    todo = []
    for shape in shapes:
        for dtype in dtypes:
            for arch in archs:
                for launch in launches(shape, dtype, arch.sm_count):
                    if wanted is None or launch.kernel in wanted:
                        todo.append((shape.name, DTYPE_NAMES[dtype], arch, launch))
    todo += [("-", "-", arch, launch) for arch in archs for launch in extra]
    done: Dict[Tuple, Dict[str, Any]] = {}
    rows = []
    for shape_name, dtype_name, arch, launch in todo:
        key = (launch.key(), arch.capability)
        if key not in done:
            result: Dict[str, Any] = {"error": ""}
            try:
                compiled = launch.compile(arch.capability)
                result.update(ptxas_resources(compiled.asm["ptx"]), shared=int(compiled.metadata.shared))
                result["binary"] = compiled.metadata.hash[:12]
            except Exception as exc:  # a compile error is a failing row, reported with the others
                result["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300] if str(exc) else ''}"
            done[key] = result
        result = done[key]
        shared = max(result.get("shared", 0), result.get("ptxas_smem", 0))  # triton's is dynamic: ptxas says 0
        row = {"kernel": launch.kernel, "variant": launch.variant, "dtype": dtype_name, "arch": f"sm_{arch.capability}"}
        row.update(gpu=arch.name, shape=shape_name, num_warps=launch.num_warps, constexprs=dict(launch.constexprs))
        row.update({k: v for k, v in result.items() if k != "shared"}, shared=shared, shared_limit=arch.shared_limit)
        if not row["error"] and shared > arch.shared_limit:
            row["error"] = f"shared memory {shared} B above the {arch.name} limit of {arch.shared_limit} B per block"
        row["ok"] = not row["error"]
        rows.append(row)
    return rows


__all__ = [
    "ARCHS",
    "DTYPES",
    "KERNELS",
    "Arch",
    "KernelShape",
    "Launch",
    "compile_rows",
    "launches",
    "ptxas_resources",
]
