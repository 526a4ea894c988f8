"""`model.checkpoint` (whole layers, a fraction, the selective 'attn' / 'mlp' modes), `model.compile` and
`model.fused_loss`, as `internlm.train.build` applies them: every variant trains like the plain eager model.

A tiny fp32 model (4 layers, grouped-query attention) on one micro-batch of packed documents of unequal length,
built by `build_model_chunks` and differentiated through `build_loss_fn`: loss and every gradient are compared
with the run without recomputation (recomputation reruns the same ops: equal to float rounding), and the
compiled layers with the eager ones (inductor reorders float sums: 1e-5 relative).
"""

from __future__ import annotations

import os
from typing import Dict, Sequence, Tuple

import pytest
import torch

from internlm.config import load_run_config
from internlm.labels import IGNORE_INDEX
from internlm.model import HeadInput, PackedDocs, positions_from_cu_seqlens
from internlm.parallel import ParallelContext
from internlm.train.activation_checkpoint import is_recomputed
from internlm.train.build import build_loss_fn, build_model_chunks

CONFIG = """
JOB_NAME = "compile_recompute"
work_dir = {work_dir!r}
seed = 3
model = dict(hidden_size=64, num_layers=4, num_attention_heads=4, num_kv_attention_heads=2, multiple_of=32,
             vocab_size=256, dtype="torch.float32", attn_backend="sdpa", checkpoint=False)
parallel = dict(tensor=1, pipeline=dict(size=1))
data = dict(seq_len=96, micro_bsz=1, micro_num=1, total_steps=1)
"""

BOUNDS = [0, 17, 40, 41, 70, 96]


def _run_config(folder: str, overrides: Sequence[str]):
    path = os.path.join(folder, "config.py")
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        with open(path, "w") as f:
            f.write(CONFIG.format(work_dir=os.path.join(folder, "work")))
    return load_run_config(path, list(overrides))


def _loss_and_grads(folder: str, overrides: Sequence[str] = (), steps: int = 1) -> Tuple[torch.Tensor, Dict]:
    run = _run_config(folder, overrides)
    pc = ParallelContext()
    (chunk,) = build_model_chunks(run, pc, torch.device("cpu"))
    loss_fn = build_loss_fn(run, pc)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (1, BOUNDS[-1]), generator=gen)
    labels = torch.randint(0, 256, (1, BOUNDS[-1]), generator=gen)
    labels[0, torch.tensor(BOUNDS[1:]) - 1] = IGNORE_INDEX  # the last token of every document takes no loss
    cu = torch.tensor(BOUNDS, dtype=torch.int32)
    positions = positions_from_cu_seqlens(cu, BOUNDS[-1])[None]
    for _ in range(steps):  # a second step runs the compiled graphs from their cache
        chunk.zero_grad(set_to_none=True)
        out = chunk(ids, cu_seqlens=PackedDocs(cu, BOUNDS), position_ids=positions)
        loss = loss_fn(out, labels)
        loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in chunk.named_parameters()}, chunk


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    loss, grads, _ = _loss_and_grads(str(tmp_path_factory.mktemp("ref")))
    return loss, grads


def _assert_same(got, want, rtol: float, atol: float) -> None:
    (loss, grads), (ref_loss, ref_grads) = got, want
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=0.0)
    assert sorted(grads) == sorted(ref_grads)
    for name, grad in ref_grads.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(grads[name], grad, rtol=rtol, atol=atol * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mode", ["True", "0.5", "attn", "mlp"])
def test_checkpoint_modes_equal_no_checkpoint(mode, reference, tmp_path):
    loss, grads, chunk = _loss_and_grads(str(tmp_path), [f"model.checkpoint={mode}"])
    layers = list(chunk.layers.values())
    wrapped = {
        "True": layers,
        "0.5": layers[:2],
        "attn": [layer.self_attn.core for layer in layers],
        "mlp": [layer.mlp for layer in layers],
    }[mode]
    assert all(is_recomputed(module) for module in wrapped)
    assert sum(is_recomputed(module) for module in chunk.modules()) == len(wrapped)
    _assert_same((loss, grads), reference, rtol=1e-6, atol=1e-6)


def test_selective_modes_save_less(tmp_path):
    """The tensors saved for backward (as `saved_tensors_hooks` see them) shrink in every recompute mode."""

    def saved_bytes(overrides):
        run = _run_config(str(tmp_path), overrides)
        (chunk,) = build_model_chunks(run, ParallelContext(), torch.device("cpu"))
        params = {p.untyped_storage().data_ptr() for p in chunk.parameters()}
        seen = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        cu = torch.tensor(BOUNDS, dtype=torch.int32)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            chunk(torch.randint(0, 256, (1, BOUNDS[-1])), cu_seqlens=PackedDocs(cu, BOUNDS))
        return sum(seen.values())

    none = saved_bytes([])
    for mode in ("attn", "mlp", "True"):
        assert saved_bytes([f"model.checkpoint={mode}"]) < none, mode


def test_fused_loss_equals_logits_loss(reference, tmp_path):
    """model.fused_loss=False (lm_head logits + cross-entropy) against the default fused, chunked head + loss."""
    loss, grads, chunk = _loss_and_grads(str(tmp_path), ["model.fused_loss=False"])
    assert not chunk.fuse_head_loss
    _assert_same((loss, grads), reference, rtol=1e-5, atol=1e-6)


def test_fused_head_returns_head_input(tmp_path):
    run = _run_config(str(tmp_path), [])
    (chunk,) = build_model_chunks(run, ParallelContext(), torch.device("cpu"))
    out = chunk(torch.randint(0, 256, (1, 8)))
    assert chunk.fuse_head_loss and isinstance(out, HeadInput) and out.logits().shape == (1, 8, 256)


@pytest.mark.slow  # inductor compiles two graphs (~30-60 s on a busy 2-core machine without a warm cache)
@pytest.mark.parametrize("mode", ["False", "mlp"])
def test_compiled_layers_equal_eager(mode, reference, tmp_path):
    from torch._dynamo.utils import counters

    counters.clear()
    got = _loss_and_grads(str(tmp_path), ["model.compile=True", f"model.checkpoint={mode}"], steps=2)
    _assert_same(got[:2], reference, rtol=1e-5, atol=1e-5)
    # every layer shares the graphs before and after the attention core (forward and backward): no per-layer
    # recompilation (dynamo would stop compiling after its recompile limit)
    assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])
