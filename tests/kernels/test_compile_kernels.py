"""tools/compile_kernels.py: every Triton kernel of internlm/kernels compiles for sm_80 and sm_90 in bf16, fp16 and
fp32 at the shipped configs' shapes, within the GPUs' shared memory, and a kernel beyond it is reported as failing.

Both run in subprocesses: compiling needs triton's real JIT functions, which a process that imported triton with
TRITON_INTERPRET=1 (tests/kernels/test_kernels.py) no longer has. The full run takes about 25 s on 2 cores (105
distinct compilations), so the suite runs all of it; triton's cache lives under the test's tmp dir.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from train_utils import REPO

# not importorskip: importing triton here, before tests/kernels/test_kernels.py sets TRITON_INTERPRET=1, would
# take the interpreter from that module's tests
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

KERNELS_DIR = os.path.join(REPO, "internlm", "kernels")


def _env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=REPO, OMP_NUM_THREADS="1", TRITON_CACHE_DIR=str(tmp_path / "triton_cache"))
    return env


def jit_kernels():
    """Every ``@triton.jit`` function defined in internlm/kernels, found in the source."""
    names = set()
    for name in os.listdir(KERNELS_DIR):
        if name.endswith(".py"):
            with open(os.path.join(KERNELS_DIR, name)) as f:
                names.update(re.findall(r"@triton\.jit(?:\([^)]*\))?\s*\ndef (\w+)", f.read()))
    return names


def test_every_kernel_compiles_for_a100_and_h100(tmp_path):
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "tools/compile_kernels.py", "--json", str(out), "--cache-dir", str(tmp_path / "cache")]
    done = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    kernels = jit_kernels()
    assert {"_rms_fwd", "_rms_bwd", "_rotary", "_swiglu_fwd", "_swiglu_bwd", "_ce_stats", "_ce_grad"} <= kernels
    shapes = {row["shape"] for row in rows}
    assert any("internlm_7b" in s for s in shapes) and any("internlm_104b" in s for s in shapes), shapes
    covered = {(row["kernel"], row["dtype"], row["arch"], row["shape"]) for row in rows}
    for kernel in kernels:  # a kernel added to the package without a registry entry fails here
        for dtype in ("bf16", "fp16", "fp32"):
            for arch in ("sm_80", "sm_90"):
                for shape in shapes:
                    assert (kernel, dtype, arch, shape) in covered, (kernel, dtype, arch, shape)
    limits = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
    for row in rows:
        assert row["ok"] and not row["error"], row
        assert 0 < row["registers"] <= 255 and row["shared_limit"] == limits[row["arch"]], row
        assert row["shared"] <= row["shared_limit"], row
    # the launchers' choices for the 104B hidden size 10240 (one row of 16384 columns, 16 warps)
    rms = [r for r in rows if r["kernel"] == "_rms_bwd" and "internlm_104b" in r["shape"]]
    assert rms and all(r["constexprs"] == {"BLOCK_M": 1, "BLOCK_N": 16384} and r["num_warps"] == 16 for r in rms)
    assert "0 failed" in done.stdout and "rows" in done.stdout.splitlines()[-1]


SCRIPT = """
import json, sys
import torch, triton, triton.language as tl
from internlm.kernels.aot import Launch, compile_rows
sys.path.insert(0, "tools")  # run from the repository root
from compile_kernels import format_table

@triton.jit
def _transpose(X, Y, BLOCK: tl.constexpr):  # a 256 x 256 fp32 tile through shared memory: 256 KiB
    offs = tl.arange(0, BLOCK)
    tile = tl.load(X + offs[:, None] * BLOCK + offs[None, :])
    tl.store(Y + offs[:, None] * BLOCK + offs[None, :], tl.trans(tile))

@triton.jit
def _broken(X, BLOCK: tl.constexpr):
    tl.store(X + tl.arange(0, BLOCK), tl.no_such_function(BLOCK))

pointers = {"X": torch.float32, "Y": torch.float32}
extra = [Launch("_transpose", "", _transpose, pointers, {"BLOCK": 256}, 8),
         Launch("_broken", "", _broken, {"X": torch.float32}, {"BLOCK": 16}, 4)]
rows = compile_rows([], extra=extra)
print(format_table(rows))
print("JSON", json.dumps(rows))
"""


def test_too_much_shared_memory_and_compile_errors_fail(tmp_path):
    script = tmp_path / "big_kernel.py"  # triton reads a jit function's source from its file
    script.write_text(textwrap.dedent(SCRIPT))
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=REPO,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.split("JSON ", 1)[1])
    big = {row["arch"]: row for row in rows if row["kernel"] == "_transpose"}
    assert set(big) == {"sm_80", "sm_90"}
    for arch, gpu in (("sm_80", "A100"), ("sm_90", "H100")):
        assert big[arch]["shared"] == 256 * 1024 and not big[arch]["ok"], big[arch]
        assert f"above the {gpu} limit" in big[arch]["error"]
    broken = [row for row in rows if row["kernel"] == "_broken"]
    assert len(broken) == 2 and all(not row["ok"] and "CompilationError" in row["error"] for row in broken), broken
    assert done.stdout.count("FAIL") == 4
