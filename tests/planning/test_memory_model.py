"""The memory model (internlm/planning/activations.py, memory.py) against measurement on the CPU.

1. Activations: the bytes the model says one micro-batch saves for backward vs the unique storages caught by
   ``torch.autograd.graph.saved_tensors_hooks`` during a forward and the loss (parameters excluded; a recomputed
   layer's saved tensors are its checkpoint's business, so its input, which the checkpoint keeps, is added),
   for fp32/bf16, micro_bsz 1/2, checkpoint off/on/half/'attn'/'mlp', and tensor parallel 2 with and without
   sequence parallel.
2. Peak: the whole estimate (weights, gradients, optimizer shards, activations in flight, loss or recompute
   transient) vs the peak of live tensor storages over the second of two real training steps, counted by a
   `TorchDispatchMode` (every storage an op returns is counted until it is freed), with the model and the
   optimizer built by `internlm.train.build` inside it: one process, dp2 zero1=2, tp2 (+SP), pp2 1F1B and
   interleaved, with checkpoint False and True (and 'mlp' in one process).

Both print their tables (``pytest -s``); docs/parallel.md quotes them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Dict, List, Sequence, Tuple

import pytest
import torch

from distributed_utils import run_distributed
from internlm.config import load_run_config
from internlm.model import PackedDocs
from internlm.parallel import ParallelContext, init_parallel_context
from internlm.planning import checkpointed_layer_count, memory_per_device, stage_memory
from internlm.planning.activations import activation_bytes_per_micro_batch
from internlm.simulation import LiveStorages
from internlm.train.build import build_loss_fn, build_model_chunks, build_optimizer, build_step_schedule
from train_utils import REPO

# hidden 256, 4 layers, vocab 4096, seq 256: model states ~100 MB, activations and loss of the same order
CONFIG = """
JOB_NAME = "memory_model"
work_dir = {work_dir!r}
seed = 7
model = dict(hidden_size=256, num_layers=4, num_attention_heads=8, multiple_of=64, vocab_size=4096,
             dtype="torch.float32", attn_backend="sdpa", checkpoint=False)
parallel = dict(tensor=1, pipeline=dict(size=1), zero1=-1, sequence_parallel=False)
data = dict(seq_len=256, micro_bsz=2, micro_num=1, total_steps=2)
"""

SAVED_TOLERANCE = 0.10
PEAK_TOLERANCE = 0.15


# ---------------------------------------------------------------------------------------------- measurement
def _config(folder: str, overrides: Sequence[str]):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "memory_model.py")
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write(CONFIG.format(work_dir=os.path.join(folder, "work")))
    return load_run_config(path, list(overrides))


def _micro_batch(run, seed: int) -> Dict:
    """Equal-length documents (one per sequence): the fused causal sdpa call."""
    n, seq = run.data.micro_bsz * run.data.seq_len, run.data.seq_len
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, run.model_config.vocab_size, (1, n), generator=gen)
    cu = torch.arange(0, n + 1, seq, dtype=torch.int32)
    mb = dict(
        input_ids=ids,
        labels=torch.roll(ids, -1, dims=1),
        cu_seqlens=cu,
        cu_seqlens_list=cu.tolist(),
        position_ids=(torch.arange(n) % seq)[None],
        max_seqlen=seq,
    )
    mb["docs"] = PackedDocs(cu, mb["cu_seqlens_list"], seq)
    return mb


def measure_saved(run, pc: ParallelContext) -> int:
    """Unique bytes saved for backward by one micro-batch's forward and loss on this rank (single stage)."""
    torch.manual_seed(0)
    (chunk,) = build_model_chunks(run, pc, torch.device("cpu"))
    loss_fn = build_loss_fn(run, pc)
    params = {p.untyped_storage().data_ptr() for p in chunk.parameters()}
    seen: Dict[int, int] = {}

    def keep(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage.nbytes())

    def pack(t: torch.Tensor) -> torch.Tensor:
        keep(t)
        return t

    def keep_inputs(module, args):
        for arg in args:
            for t in arg if isinstance(arg, tuple) else (arg,):
                if isinstance(t, torch.Tensor):
                    keep(t)

    # a recomputed module saves nothing through these hooks (its checkpoint's own hooks take over); it keeps its
    # inputs: a layer its hidden states and the rotary cos/sin, the attention core q/k/v, the MLP its input
    setting = run.model.checkpoint
    layers = list(chunk.layers.values())
    if setting == "attn":
        recomputed = [layer.self_attn.core for layer in layers]
    elif setting == "mlp":
        recomputed = [layer.mlp for layer in layers]
    else:
        recomputed = layers[: checkpointed_layer_count(setting, len(layers))]
    handles = [module.register_forward_pre_hook(keep_inputs) for module in recomputed]
    mb = _micro_batch(run, seed=1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = chunk(
            mb["input_ids"], cu_seqlens=mb["docs"], position_ids=mb["position_ids"], max_seqlen=mb["max_seqlen"]
        )
        loss = loss_fn(logits, mb["labels"])
    for handle in handles:
        handle.remove()
    del loss, logits
    return sum(seen.values())


def measure_peak(run, pc: ParallelContext, steps: int = 2) -> int:
    """Peak bytes of live tensor storages over the last of ``steps`` training steps (the first step allocates
    the AdamW moments), with model and optimizer built inside the counter."""
    mode = LiveStorages()
    torch.manual_seed(0)
    with mode:
        chunks = build_model_chunks(run, pc, torch.device("cpu"))
        optimizer = build_optimizer(chunks, run, pc)
        loss_fn = build_loss_fn(run, pc)
        schedule = build_step_schedule(run, pc)
    tokens = run.data.micro_bsz * run.data.seq_len * run.data.micro_num * pc.dp_size
    for step in range(steps):
        batch = [_micro_batch(run, seed=100 * step + i) for i in range(run.data.micro_num)]
        with mode:
            if step == steps - 1:
                mode.reset_peak()
            optimizer.begin_step(len(batch))
            schedule.forward_backward(chunks, batch, loss_fn, 1.0 / tokens)
            optimizer.step()
        del batch
    optimizer.close()
    return mode.peak


def _estimate_saved(run, tensor: int) -> float:
    return activation_bytes_per_micro_batch(
        run.model_config,
        run.data.micro_bsz,
        run.data.seq_len,
        tensor,
        run.parallel.sequence_parallel,
        run.model.checkpoint,
    )


def _estimate_peak(run, layout, pp_rank: int) -> float:
    return stage_memory(
        run.model_config,
        layout,
        run.data.micro_bsz,
        run.data.seq_len,
        run.data.micro_num,
        run.model.checkpoint,
        pipeline_rank=pp_rank,
    ).total


# ---------------------------------------------------------------------------------------------- cases
SAVED_SINGLE = {
    "fp32 mbsz1": ["data.micro_bsz=1"],
    "fp32 mbsz2": [],
    "bf16 mbsz2": ["model.dtype=torch.bfloat16"],
    "bf16 mbsz1 ckpt": ["model.dtype=torch.bfloat16", "data.micro_bsz=1", "model.checkpoint=True"],
    "fp32 mbsz2 ckpt 0.5": ["model.checkpoint=0.5"],
    "fp32 mbsz2 ckpt attn": ["model.checkpoint='attn'"],
    "bf16 mbsz2 ckpt mlp": ["model.dtype=torch.bfloat16", "model.checkpoint='mlp'"],
}
SAVED_TP2 = {
    "tp2 fp32": ["parallel.tensor=2"],
    "tp2+sp fp32": ["parallel.tensor=2", "parallel.sequence_parallel=True"],
    "tp2+sp bf16": ["parallel.tensor=2", "parallel.sequence_parallel=True", "model.dtype=torch.bfloat16"],
    "tp2+sp fp32 ckpt": ["parallel.tensor=2", "parallel.sequence_parallel=True", "model.checkpoint=True"],
}
PEAK_SINGLE = {
    ("1 process", "False"): [],
    ("1 process", "True"): ["model.checkpoint=True"],
    ("1 process", "mlp"): ["model.checkpoint='mlp'"],
}
PEAK_TWO = {
    ("dp2 zero1=2", "False"): ["parallel.zero1=2"],
    ("tp2+sp", "False"): ["parallel.tensor=2", "parallel.sequence_parallel=True"],
    ("tp2+sp", "True"): ["parallel.tensor=2", "parallel.sequence_parallel=True", "model.checkpoint=True"],
    ("pp2 1F1B, micro_num 2", "False"): ["parallel.pipeline.size=2", "data.micro_num=2"],
    ("pp2 interleaved x2, micro_num 2", "True"): [
        "parallel.pipeline.size=2",
        "model.num_chunks=2",
        "data.micro_num=2",
        "model.checkpoint=True",
    ],
}


def _two_process_worker(rank: int, world_size: int, folder: str) -> Dict:
    """On 2 ranks: saved bytes of the tp2 cases, then the peak of every two-process layout."""
    torch.set_num_threads(1)
    out: Dict = {"saved": {}, "peak": {}}
    for name, overrides in SAVED_TP2.items():
        run = _config(folder, overrides)
        layout = run.layout(world_size)
        pc = init_parallel_context(layout, rank)
        out["saved"][name] = (measure_saved(run, pc), _estimate_saved(run, layout.tensor))
    for key, overrides in PEAK_TWO.items():
        run = _config(folder, overrides)
        layout = run.layout(world_size)
        pc = init_parallel_context(layout, rank)
        out["peak"][key] = (measure_peak(run, pc), _estimate_peak(run, layout, pc.pp_rank))
    return out


def _print_table(title: str, rows: List[Tuple[str, ...]], header: Tuple[str, ...]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")


def _mb(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


@pytest.fixture(scope="module")
def two_process(tmp_path_factory):
    return run_distributed(_two_process_worker, 2, str(tmp_path_factory.mktemp("memory_two")))


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.slow  # shares a two-process run (~30-60 s on 2 CPU cores) with the peak test
def test_saved_activations_match_the_model(tmp_path, two_process):
    torch.set_num_threads(1)
    rows, errors = [], []
    for name, overrides in SAVED_SINGLE.items():
        run = _config(str(tmp_path), overrides)
        measured, estimate = measure_saved(run, ParallelContext()), _estimate_saved(run, 1)
        rows.append((name, _mb(estimate), _mb(measured), f"{estimate / measured - 1:+.1%}"))
        errors.append((name, estimate / measured - 1))
    for name in SAVED_TP2:
        for rank, result in enumerate(two_process):
            measured, estimate = result["saved"][name]
            rows.append((f"{name} (rank {rank})", _mb(estimate), _mb(measured), f"{estimate / measured - 1:+.1%}"))
            errors.append((name, estimate / measured - 1))
    _print_table("activations saved per micro-batch (4 layers + head)", rows, ("case", "model", "saved", "error"))
    for name, error in errors:
        assert abs(error) <= SAVED_TOLERANCE, (name, error)


@pytest.mark.slow
def test_peak_memory_of_training_steps_matches_the_model(tmp_path, two_process):
    torch.set_num_threads(1)
    rows, errors = [], []
    for (layout_name, ckpt), overrides in PEAK_SINGLE.items():
        run = _config(str(tmp_path), overrides)
        measured = measure_peak(run, ParallelContext())
        estimate = _estimate_peak(run, run.layout(1), 0)
        rows.append((layout_name, ckpt, _mb(estimate), _mb(measured), f"{estimate / measured - 1:+.1%}"))
        errors.append((layout_name, ckpt, estimate / measured - 1))
    for layout_name, ckpt in PEAK_TWO:
        for rank, result in enumerate(two_process):
            measured, estimate = result["peak"][(layout_name, ckpt)]
            label = f"{layout_name} (rank {rank})"
            rows.append((label, ckpt, _mb(estimate), _mb(measured), f"{estimate / measured - 1:+.1%}"))
            errors.append((label, ckpt, estimate / measured - 1))
    _print_table(
        "peak tensor memory per process over a training step (fp32, hidden 256, 4 layers, vocab 4096, 2 x 256 tokens)",
        rows,
        ("layout", "checkpoint", "estimate", "measured", "error"),
    )
    for label, ckpt, error in errors:
        assert abs(error) <= PEAK_TOLERANCE, (label, ckpt, error)


def test_shipped_7b_config_fits_80gb():
    """configs/internlm_7b at its intended 128 GPUs (and the 104B's long-context phase at 2,048) fits an 80 GB device
    (92% usable) by the model."""
    shipped = [("internlm_7b", phase, 128) for phase in ("phase1.py", "phase2.py", "phase3.py")]
    for model, phase, world in shipped + [("internlm_104b", "phase4.py", 2048)]:
        run = load_run_config(os.path.join(REPO, "configs", model, phase))
        layout = run.layout(world)
        assert not layout.fit_problems(run.model_config, run.data.micro_bsz, run.data.seq_len, run.data.micro_num)
        mem = memory_per_device(
            run.model_config, layout, run.data.micro_bsz, run.data.seq_len, run.data.micro_num, run.model.checkpoint
        )
        assert mem["total"] <= 0.92 * 81559 * 2**20, (phase, {k: v / 2**30 for k, v in mem.items()})


def test_plan_cli_recommends_a_fitting_layout_for_7b():
    cmd = [
        sys.executable,
        os.path.join(REPO, "tools", "plan.py"),
        "--preset",
        "internlm-7b",
        "--devices",
        "8",
        "--device-type",
        "h100-sxm",
        "--recommend",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| 1 | ") and "GiB (fits)" in line]
    assert lines, proc.stdout
    print(proc.stdout)


def test_model_formulas_by_hand():
    """Per-layer bytes of a bf16 MHA layer without tensor parallelism, and the scaling with T and SP."""
    from internlm.model import InternLMConfig
    from internlm.parallel import Layout
    from internlm.parallel.pipeline import schedule_order
    from internlm.planning.activations import head_memory, layer_activation_bytes

    mc = InternLMConfig(
        hidden_size=64, num_layers=4, num_attention_heads=4, vocab_size=256, multiple_of=32, dtype="bf16"
    )
    n, h, f = 100, 64, mc.intermediate_size
    # fused kernels: the norms save x (bf16) and an fp32 rstd, SwiGLU saves gate and up (silu recomputed)
    expected = 16 * n * h + 6 * n * f + 8 * n + 4 * n * 4
    assert layer_activation_bytes(mc, n) == expected
    assert layer_activation_bytes(mc, n, selective="mlp") == expected - 6 * n * f
    assert layer_activation_bytes(mc, n, selective="attn") == expected - 4 * n * 4
    tp2 = layer_activation_bytes(mc, n, 2)
    tp2_sp = layer_activation_bytes(mc, n, 2, sequence_parallel=True)
    assert tp2_sp < tp2 < expected
    assert tp2 - tp2_sp == pytest.approx(2 * 2 * n * h / 2 + 8 * n / 2)
    head = head_memory(mc, n, fused_loss=False)
    assert head.transient == 8 * n * 256  # loss backward: two fp32 (N, V) gradients
    fused = head_memory(mc, n)  # one chunk (all 100 tokens) of bf16 logits and its fp32 working copy
    assert fused.transient == (2 + 4) * n * 256 and fused.saved == 2 * n * h + 4 * n + 2 * n * h + 2 * 256 * h
    # 1F1B: stage 0 of 4 holds min(4, m) micro-batches
    events = schedule_order(4, 0, 1, 8)
    held = peak = 0
    for kind, _, _ in events:
        held += 1 if kind == "F" else -1
        peak = max(peak, held)
    assert peak == 4
    single = memory_per_device(mc, Layout.single(), 1, n, 1, False, attn_backend="flash")
    assert single["optimizer"] == 12 * mc.num_params() and single["gradients"] == 4 * mc.num_params()
    zero = memory_per_device(mc, Layout.create(8, zero1=8), 1, n, 1, False)
    assert zero["optimizer"] == pytest.approx(12 * mc.num_params() / 8)
    assert zero["gradients"] == pytest.approx(4 * mc.num_params() * (1 + 1 / 8))
