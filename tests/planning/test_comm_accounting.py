"""Bytes the optimizer sends per rank and step, counted on the torch.distributed calls, against the optimum.

Each spawned gloo worker records (`internlm.simulation.CommRecorder`) ``dist.all_reduce``,
``reduce_scatter_single`` / ``reduce_scatter_tensor``,
``all_gather_single`` / ``all_gather_into_tensor``, ``all_gather``, ``reduce_scatter`` and ``broadcast`` and
records every call of one training step (``begin_step`` .. ``step()``, whose end launches the parameter
gathers) of a small InternLM (bf16, ``internlm-tiny`` with 2 layers) with a small ``reduce_bucket_size`` (several
buckets per buffer). A call is the optimizer's when its tensor lives in a flat buffer: the fp32 gradient
accumulation tensor or reduced slice (gradients), or the model-dtype parameter buffer (parameter gather).
Model collectives of tensor parallelism and the scalar all-reduces (norm, token count) are not counted.

Volume sent by one rank for a collective over ``g`` ranks (ring algorithms; ``B`` = bytes of the full tensor):
all-reduce ``2 (g-1)/g B``; reduce-scatter ``(g-1)/g B`` (B = input); all-gather ``(g-1)/g B`` (B = output).

Optimum per rank and step, with ``N`` trainable elements on the rank (its tensor/pipeline shard), ``z`` =
zero1 size, ``r = dp / z`` zero1 replicas, ``t`` = tensor size, ``P`` the elements whose gradient is partial over
the tensor group (sequence-parallel norm weights), ``b`` bytes per model-dtype element::

    gradients   4 * [ N (z-1)/z  +  2 (N/z) (r-1)/r  +  2 (P/z) (t-1)/t ]
                  reduce-scatter    replica all-reduce   tensor sum of the partial slices
    parameters  b * N (z-1)/z                                    (all-gather of the updated slices)

(each rank must receive the sum of its N/z owned elements from z ranks, then agree with r-1 replicas, and the
slices must be gathered back). The measured values exceed them only by the zero1 padding of each buffer
(< z * 16 elements). The old scheme, an all-reduce of the whole buffer over dp, sent ``8 N (dp-1)/dp``.
"""

from __future__ import annotations

from typing import Any, Dict

import pytest
import torch

from distributed_utils import run_distributed
from internlm.model import InternLM, InternLMConfig
from internlm.optim import HybridZeroOptimizer
from internlm.parallel import Layout, init_parallel_context, make_loss_fn, parallelize_model
from internlm.parallel.comm import group_size
from internlm.simulation import CommRecorder

SEQ = 32


def _worker(rank: int, world: int, tensor: int, zero1: int, sequence_parallel: bool) -> Dict[str, Any]:
    pc = init_parallel_context(
        Layout.create(world, tensor=tensor, zero1=zero1, sequence_parallel=sequence_parallel), rank
    )
    config = InternLMConfig.preset("internlm-tiny", num_layers=2, dtype=torch.bfloat16, attn_backend="sdpa")
    model = parallelize_model(InternLM(config), pc)
    opt = HybridZeroOptimizer([model], pc, lr=1e-3, reduce_bucket_size=4 * 1024)  # 1024 fp32 per bucket
    loss_fn = make_loss_fn(pc)
    gen = torch.Generator().manual_seed(pc.dp_rank)
    recorder = CommRecorder(active=False)
    recorder.install()
    try:
        for step in range(2):  # the second step is measured (the first one's gathers are waited in its forward)
            recorder.active = step == 1
            opt.begin_step(2)
            for _ in range(2):
                ids = torch.randint(0, config.vocab_size, (1, SEQ), generator=gen)
                labels = torch.randint(0, config.vocab_size, (1, SEQ), generator=gen)
                (loss_fn(model(ids), labels) / SEQ).backward()
            norm, skipped = opt.step()
            recorder.active = False
        opt.sync_params()
    finally:
        recorder.restore()
    grad_storages = set()
    for buffer in opt.buffers:
        grad_storages.add(buffer.grads.untyped_storage().data_ptr())
        grad_storages.add(buffer.grad_shard().untyped_storage().data_ptr())
    param_storages = {buffer.params.untyped_storage().data_ptr() for buffer in opt.buffers}
    grads = [c for c in recorder.ops if c.storage in grad_storages]
    params = [c for c in recorder.ops if c.storage in param_storages]
    numel = sum(buffer.numel for buffer in opt.buffers)
    partial = sum(buffer.numel for buffer in opt.buffers if buffer.key.tp_partial_grad)
    z, r, t = pc.zero1_size, pc.dp_size // pc.zero1_size, pc.tp_size
    return dict(
        rank=rank,
        tp_rank=pc.tp_rank,
        # the gathered bf16 parameters: every slice as its owner rounded its master
        params=[buffer.params.clone() for buffer in opt.buffers],
        own_slices_exact=all(
            torch.equal(buffer.param_shard(), master.to(buffer.params.dtype))
            for buffer, master in zip(opt.buffers, opt.masters)
        ),
        grad_bytes=sum(c.sent for c in grads),
        param_bytes=sum(c.sent for c in params),
        grad_calls=sorted({(c.kind, c.group_size) for c in grads}),
        param_calls=sorted({(c.kind, c.group_size) for c in params}),
        grad_optimum=4 * (numel * (z - 1) / z + 2 * (numel / z) * (r - 1) / r + 2 * (partial / z) * (t - 1) / t),
        param_optimum=2 * numel * (z - 1) / z,
        old_scheme=8 * numel * (pc.dp_size - 1) / pc.dp_size,
        numel=numel,
        buckets=len(opt.grad_reducer.buckets),
        replica_size=group_size(pc.zero1_replica_group),
        finite=bool(torch.isfinite(norm)) and not bool(skipped),
    )


@pytest.mark.parametrize(
    "name,tensor,zero1,sequence_parallel",
    [("dp4 zero1=2", 1, 2, False), ("dp2 x tp2 (sp)", 2, 2, True)],
)
def test_gradient_and_gather_bytes_are_optimal(name, tensor, zero1, sequence_parallel):
    results = run_distributed(_worker, 4, tensor, zero1, sequence_parallel)
    for res in results:
        print(
            f"\n{name} rank {res['rank']}: N={res['numel']} elements, {res['buckets']} buckets; gradients "
            f"{res['grad_bytes']:.0f} B sent vs optimum {res['grad_optimum']:.0f} B "
            f"({res['grad_bytes'] / res['grad_optimum']:.4f}x; old dp all-reduce {res['old_scheme']:.0f} B); "
            f"parameter all-gather {res['param_bytes']:.0f} B vs optimum {res['param_optimum']:.0f} B "
            f"({res['param_bytes'] / res['param_optimum']:.4f}x); calls {res['grad_calls'] + res['param_calls']}"
        )
        assert res["finite"] and res["buckets"] >= 4
        assert res["replica_size"] == 4 // tensor // zero1
        assert res["grad_optimum"] <= res["grad_bytes"] <= 1.05 * res["grad_optimum"]
        assert res["param_optimum"] <= res["param_bytes"] <= 1.05 * res["param_optimum"]
        kinds = {call for call, _ in res["grad_calls"]}
        assert "reduce_scatter_single" in kinds or "reduce_scatter_tensor" in kinds
        assert all(size < 4 for _, size in res["grad_calls"])  # nothing over a dp group of 4
        assert res["own_slices_exact"]
    for res in results:  # data-parallel ranks (same tensor rank) hold identical gathered parameters
        first = next(other for other in results if other["tp_rank"] == res["tp_rank"])
        assert all(torch.equal(a, b) for a, b in zip(res["params"], first["params"]))
