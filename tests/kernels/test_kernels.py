"""internlm.kernels: every op's Triton kernel and eager fallback against the model's current formulas.

Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter. Triton decides interpreted vs
compiled when a function is decorated, so tests/conftest.py imports triton and the kernels with TRITON_INTERPRET=1
before any test module (or a library it imports: megatron-core, lm-eval) can import triton, then restores the
variable: the Triton-variant tests set it again (monkeypatch), every other test of the session keeps the eager path
on CPU. The Triton variants skip, with the reason, where triton is not installed (a skip fails CI).
"""

from __future__ import annotations

import gc
import importlib.util
import os
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from distributed_utils import run_distributed
from internlm.kernels import (
    apply_rotary,
    chunked_linear_cross_entropy,
    default_chunk_tokens,
    dispatch,
    kernel_backend,
    rms_norm,
    rotary_cos_sin,
    swiglu,
)
from internlm.labels import IGNORE_INDEX
from triton_interpret import load_kernels_interpreted

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def _has_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


HAS_TRITON = _has_triton()
load_kernels_interpreted()  # in the workers this module spawns too (they load no conftest)


def _enable_triton(monkeypatch=None) -> str:
    """Make Triton usable for DEVICE tensors; returns why it cannot be ('' when it can)."""
    if not HAS_TRITON:
        return "triton is not installed: only the eager fallbacks are tested"
    if not HAS_CUDA:
        if monkeypatch is not None:
            monkeypatch.setenv("TRITON_INTERPRET", "1")
        else:
            os.environ["TRITON_INTERPRET"] = "1"
    return dispatch.triton_unavailable_reason(DEVICE)


@pytest.fixture(params=["eager", "triton"])
def backend(request, monkeypatch):
    if request.param == "triton":
        reason = _enable_triton(monkeypatch)
        if reason:
            pytest.skip(reason)
    dispatch.CALLS.clear()
    with kernel_backend(request.param):
        yield request.param


# ---------------------------------------------------------------- the model's formulas (internlm/model/modeling.py)
def ref_rms_norm(x, weight, eps):
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight


def ref_apply_rotary(x, position_ids, base):
    dim = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))
    freqs = position_ids.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * emb.cos() + rotated * emb.sin()).to(x.dtype)


def ref_swiglu(gate, up):
    return F.silu(gate) * up


def run_both(fn, ref, inputs, grad_out_seed=0):
    """Forward + backward of ``fn`` and ``ref`` on copies of ``inputs``: ((out, *grads), (ref_out, *ref_grads))."""
    results = []
    for f in (fn, ref):
        xs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        out = f(*xs)
        gen = torch.Generator(device="cpu").manual_seed(grad_out_seed)
        dy = torch.randn(out.shape, generator=gen).to(out)
        out.backward(dy)
        results.append((out.detach(), *[x.grad for x in xs if x.requires_grad]))
    return results


def assert_all_close(got, want, **tol):
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), **tol)


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=3e-2)}


# --------------------------------------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_model(backend, dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 19, 48, generator=gen) * 3).to(DEVICE, dtype)
    w = (1 + 0.1 * torch.randn(48, generator=gen)).to(DEVICE, dtype)
    got, want = run_both(lambda a, b: rms_norm(a, b, 1e-5), lambda a, b: ref_rms_norm(a, b, 1e-5), [x, w])
    assert got[0].dtype == want[0].dtype and got[1].dtype == dtype and got[2].dtype == dtype
    assert_all_close(got, want, **TOL[dtype])
    if backend == "eager":  # the same ops as the model: bit-identical
        assert torch.equal(got[0], want[0])
    assert dispatch.CALLS[("rms_norm", backend)] == 1


def test_rms_norm_saves_only_x_and_rstd(backend):
    x = torch.randn(6, 32, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(32, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rms_norm(x, w, 1e-6)
    assert sorted((tuple(t.shape), t.dtype) for t in saved) == sorted(
        [((6, 32), torch.bfloat16), ((32,), torch.bfloat16), ((6,), torch.float32)]
    )


# ---------------------------------------------------------------------------------------------------- rotary
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_matches_model(backend, dtype):
    gen = torch.Generator().manual_seed(1)
    positions = torch.cat([torch.arange(13), torch.arange(11)]).to(DEVICE)  # two packed documents
    cos, sin = rotary_cos_sin(positions, 16, 10000.0)  # once, shared by q and k (different head counts)
    assert cos.shape == (24, 8) and cos.dtype == torch.float32
    for heads in (4, 2):
        x = torch.randn(24, heads, 16, generator=gen).to(DEVICE, dtype)
        got, want = run_both(
            lambda a: apply_rotary(a, cos, sin), lambda a: ref_apply_rotary(a, positions, 10000.0), [x]
        )
        assert_all_close(got, want, **TOL[dtype])
    assert dispatch.CALLS[("apply_rotary", backend)] == 4  # forward and backward of q and k


# ---------------------------------------------------------------------------------------------------- SwiGLU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_model(backend, dtype):
    gen = torch.Generator().manual_seed(2)
    gate, up = (torch.randn(3, 7, 40, generator=gen).mul(3).to(DEVICE, dtype) for _ in range(2))
    got, want = run_both(swiglu, ref_swiglu, [gate, up])
    assert_all_close(got, want, **TOL[dtype])
    if backend == "eager":
        assert torch.equal(got[0], want[0])
    saved = []
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        swiglu(g, u)
    assert len(saved) == 2 and all(t.shape == gate.shape and t.dtype == dtype for t in saved)
    assert dispatch.CALLS[("swiglu", backend)] == 2


# ------------------------------------------------------------------------------------ gradcheck (eager, float64)
def test_gradcheck_eager_float64():
    gen = torch.Generator().manual_seed(3)
    kw = dict(dtype=torch.float64, device=DEVICE)
    x, w = torch.randn(5, 12, generator=gen).to(**kw), torch.randn(12, generator=gen).to(**kw)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6), (x.requires_grad_(), w.requires_grad_()))
    cos, sin = rotary_cos_sin(torch.arange(5, device=DEVICE), 8, 10000.0, torch.float64)
    q = torch.randn(5, 3, 8, generator=gen).to(**kw).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: apply_rotary(a, cos, sin), (q,))
    g, u = (torch.randn(4, 9, generator=gen).to(**kw).requires_grad_() for _ in range(2))
    assert torch.autograd.gradcheck(swiglu, (g, u))


# --------------------------------------------------------------------------------------- chunked cross-entropy
def ce_case(tokens=37, hidden=16, vocab=96, dtype=torch.float32, seed=4, shape=None, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    w = (torch.randn(vocab, hidden, generator=gen) * 0.5).to(device, dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    labels[::5] = IGNORE_INDEX
    if shape is not None:
        h, labels = h.reshape(*shape, hidden), labels.reshape(shape)
    return h, w, labels.to(device)


def ref_ce(h, w, labels, eps):
    logits = h @ w.T
    return F.cross_entropy(
        logits.reshape(-1, w.shape[0]).to(torch.promote_types(h.dtype, torch.float32)),
        labels.reshape(-1),
        reduction="sum",
        label_smoothing=eps,
    )


def ref_ce_grads(h, w, labels, eps):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = ref_ce(h, w, labels, eps)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("eps, chunk", [(0.0, 8), (0.1, 5), (0.1, None)])
def test_chunked_ce_matches_cross_entropy(backend, eps, chunk):
    h, w, labels = ce_case(shape=(1, 37))
    got, want = run_both(
        lambda a, b: chunked_linear_cross_entropy(a, b, labels, label_smoothing=eps, chunk_tokens=chunk),
        lambda a, b: ref_ce(a, b, labels, eps),
        [h, w],
    )
    assert got[0].dtype == torch.float32 and got[1].shape == h.shape
    assert_all_close(got, want, rtol=1e-5, atol=1e-5)
    assert dispatch.CALLS[("linear_cross_entropy", backend)] == 1


def test_chunked_ce_bf16(backend):
    h, w, labels = ce_case(dtype=torch.bfloat16)
    got, want = run_both(
        lambda a, b: chunked_linear_cross_entropy(a, b, labels, label_smoothing=0.1, chunk_tokens=16),
        lambda a, b: ref_ce(a, b, labels, 0.1),
        [h, w],
    )
    torch.testing.assert_close(got[0], want[0], rtol=1e-3, atol=1e-3)
    assert_all_close(got[1:], want[1:], rtol=3e-2, atol=3e-2)


def test_chunked_ce_float64_and_frozen_weight():
    h, w, labels = ce_case(dtype=torch.float64)
    got, want = run_both(
        lambda a, b: chunked_linear_cross_entropy(a, b, labels, label_smoothing=0.2, chunk_tokens=6),
        lambda a, b: ref_ce(a, b, labels, 0.2),
        [h, w],
    )
    assert_all_close(got, want, rtol=1e-10, atol=1e-10)
    hg = h.clone().requires_grad_()
    (chunked_linear_cross_entropy(hg, w, labels, chunk_tokens=6) * 3).backward()  # weight frozen, grad scaled
    torch.testing.assert_close(hg.grad, 3 * ref_ce_grads(h, w, labels, 0.0)[1])
    with torch.no_grad():
        torch.testing.assert_close(chunked_linear_cross_entropy(h, w, labels), ref_ce(h, w, labels, 0.0))


def _vocab_parallel_worker(rank, world_size, backends):
    """gloo on CPU tensors: the Triton variant runs through the interpreter (on CPU-only machines)."""
    from internlm.parallel.cross_entropy import vocab_shard

    results = {}
    for name in backends:
        if name == "triton":
            if not HAS_TRITON or HAS_CUDA:
                continue
            os.environ["TRITON_INTERPRET"] = "1"
            if dispatch.triton_unavailable_reason(torch.device("cpu")):
                continue
        for eps in (0.0, 0.1):
            h, w, labels = ce_case(tokens=23, vocab=64, seed=5, device="cpu")
            shard = w.chunk(world_size)[rank].clone().requires_grad_()
            hidden = h.clone().requires_grad_()
            with kernel_backend(name):
                vocab = vocab_shard(dist.group.WORLD, shard.shape[0])
                loss = chunked_linear_cross_entropy(
                    hidden, shard, labels, label_smoothing=eps, chunk_tokens=7, shard=vocab
                )
            loss.backward()
            dist.all_reduce(hidden.grad)  # what the tensor region's backward does with the partial d hidden
            results[name, eps] = (
                loss.detach(),
                hidden.grad,
                shard.grad,
                dispatch.CALLS[("linear_cross_entropy", name)],
            )
    return results


def test_chunked_ce_vocab_parallel():
    results = run_distributed(_vocab_parallel_worker, 2, ("eager", "triton"))
    assert ("eager", 0.0) in results[0]
    if HAS_TRITON and not HAS_CUDA and dispatch.load_triton() is not None:
        assert ("triton", 0.1) in results[0], "the Triton interpreter should run in the spawned workers"
    for (name, eps), (loss, dh, dw0, calls) in results[0].items():
        loss_ref, dh_ref, dw_ref = ref_ce_grads(*ce_case(tokens=23, vocab=64, seed=5, device="cpu"), eps)
        assert calls > 0
        for rank_result in results:  # every rank: the full loss, and d hidden once reduced
            torch.testing.assert_close(rank_result[name, eps][0], loss_ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(rank_result[name, eps][1], dh_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.cat([dw0, results[1][name, eps][2]]), dw_ref, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------------------- memory
class PeakMemory(TorchDispatchMode):
    """Live bytes of the storages created inside the block (inputs excluded), freed when their last view dies.

    ``collect``: run the garbage collector before every matmul, the ops that allocate chunk buffers (Triton's
    interpreter keeps its host views of a kernel's arguments in reference cycles, which would count a freed
    buffer until the next collection).
    """

    def __init__(self, collect=False):
        super().__init__()
        self.live, self.external, self.current, self.peak, self.collect = {}, set(), 0, 0, collect

    def _free(self, key):
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.collect and func is torch.ops.aten.mm.default:
            gc.collect()
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in self.live:
                self.external.add(t.untyped_storage()._cdata)
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.live and key not in self.external:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.current)
        return out


def head_and_loss_peak(fused, tokens, hidden, vocab, dtype=torch.float32, device="meta", chunk=None):
    h = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(vocab, hidden, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,), device=device)
    with PeakMemory(collect=device != "meta") as mem:
        if fused:
            loss = chunked_linear_cross_entropy(h, w, labels, chunk_tokens=chunk)
        else:  # the model's lm_head + make_loss_fn at tp = 1
            loss = F.cross_entropy((h @ w.T).float(), labels, reduction="sum")
        loss.backward()
    return mem.peak


def test_chunked_ce_peak_memory_is_bounded():
    """tokens=4096, hidden=256, V=103168, fp32, on the meta device (exact allocation sizes, no compute)."""
    tokens, hidden, vocab = 4096, 256, 103168
    chunk = default_chunk_tokens(vocab)
    grads = (vocab + tokens) * hidden * 4
    fused, eager = (head_and_loss_peak(f, tokens, hidden, vocab) for f in (True, False))
    print(
        f"\nhead + loss peak, tokens={tokens} hidden={hidden} V={vocab} fp32: fused {fused / 2**20:.1f} MiB "
        f"(chunk {chunk} tokens, eager fallback kernels) vs eager {eager / 2**20:.1f} MiB ({eager / fused:.1f}x)"
    )
    assert fused <= grads + 2 * chunk * vocab * 4 + 2**16  # d hidden, d W, the chunk's logits and one fp32 copy
    assert eager >= 3 * tokens * vocab * 4
    small = head_and_loss_peak(True, tokens, hidden, vocab, chunk=64)
    assert small <= grads + 2 * 64 * vocab * 4 + 2**16


def test_chunked_ce_triton_path_keeps_no_fp32_copy(monkeypatch):
    reason = _enable_triton(monkeypatch)
    if reason:
        pytest.skip(reason)
    tokens, hidden, vocab, chunk = 64, 16, 2048, 16
    with kernel_backend("triton"):
        peak = head_and_loss_peak(True, tokens, hidden, vocab, device=DEVICE, chunk=chunk)
    assert peak <= (vocab + tokens) * hidden * 4 + chunk * vocab * 4 + 2**14  # only the chunk's own logits


# ------------------------------------------------------------------------------------------------- dispatch
def test_dispatch_rules(monkeypatch):
    x = torch.randn(4, 8)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    dispatch.CALLS.clear()
    rms_norm(x, torch.ones(8), 1e-6)  # CPU without the interpreter: eager
    assert dispatch.CALLS == {("rms_norm", "eager"): 1}
    with pytest.raises(RuntimeError, match="forced"), kernel_backend("triton"):
        rms_norm(x.to("meta"), torch.ones(8, device="meta"), 1e-6)
    with kernel_backend("triton"):  # float64 has no kernel: eager even when Triton is forced
        swiglu(x.double(), x.double())
    assert dispatch.CALLS[("swiglu", "eager")] == 1
    monkeypatch.setenv("INTERNLM_KERNELS", "eager")
    assert dispatch.current_backend() == "eager"
    with pytest.raises(ValueError):
        dispatch.set_backend("cuda")


# ------------------------------------------------------------------------------------------- inside the model
def test_model_triton_path_equals_eager(monkeypatch):
    """The model (packed documents, GQA) and its fused head + loss through the Triton kernels (the interpreter on the
    CPU) against the same model on the eager references: loss and every gradient."""
    from internlm.model import InternLM, InternLMConfig, PackedDocs
    from internlm.parallel import ParallelContext, make_loss_fn

    reason = _enable_triton(monkeypatch)
    if reason:
        pytest.skip(reason)
    cfg = InternLMConfig.preset("internlm-tiny", num_kv_attention_heads=2, attn_backend="sdpa")
    bounds = [0, 10, 30, 31, 48]
    cu = torch.tensor(bounds, dtype=torch.int32, device=DEVICE)
    gen = torch.Generator().manual_seed(0)
    ids, labels = (torch.randint(0, 256, (1, 48), generator=gen).to(DEVICE) for _ in range(2))
    loss_fn = make_loss_fn(ParallelContext())
    results = {}
    for name in ("eager", "triton"):
        model = InternLM(cfg).to(DEVICE)
        model.fuse_head_loss = True
        dispatch.CALLS.clear()
        with kernel_backend(name):
            loss = loss_fn(model(ids, cu_seqlens=PackedDocs(cu, bounds)), labels)
            loss.backward()
        assert {backend for _, backend in dispatch.CALLS} == {name}
        results[name] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    (loss, grads), (ref_loss, ref_grads) = results["triton"], results["eager"]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-5 * g.abs().max().item(), msg=n)
