"""One rank of a cluster in this process: the real training step on a fake process group and fake tensors.

`simulate_rank` joins ``torch.distributed``'s fake backend as rank ``r`` of ``world_size`` (every collective returns
at once, nothing is sent), builds the rank's parallel context (every process group of the layout), its model chunks
and loss (`ModelState`, the Trainer's collaborator) on the meta device, materialises them as fake CPU tensors in
the model dtype (`FakeTensorMode`: shapes and dtypes, no memory, no compute), builds the hybrid ZeRO optimizer and
the configured pipeline schedule, then runs two optimizer steps with `StepRunner.train_step` on micro-batches of the
loader's shapes (the loader itself when the data is on this machine, synthetic tokens otherwise). The second step
is the steady state: its operations (`CommRecorder`) and its peak of live storages (`LiveStorages`) are reported.
The bytes a checkpoint save would write: this rank's model and optimizer files by the writer rules of
`internlm.checkpoint.files` (`model_writer_dp`, `writes_optimizer_file`), counted without writing.

Fake CUDA tensors fail in backward (docs/scale.md), so the step runs on the CPU code path: the CUDA-only branches
(streams, events, memory stats, flash-attn, Triton kernels) are not exercised.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List

import numpy as np
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._pytree import tree_flatten

from internlm.checkpoint.files import model_writer_dp, writes_optimizer_file
from internlm.data.packing import collate, pack_window
from internlm.kernels import kernel_backend
from internlm.parallel import init_parallel_context
from internlm.train.build import build_step_schedule
from internlm.train.model_state import ModelState
from internlm.train.phases import Phase
from internlm.train.step_runner import StepRunner

from .live_memory import LiveStorages
from .prediction import Prediction, predict
from .recorder import CommRecorder, Op, bytes_by_dimension

STEPS = 2


@dataclass
class RankResult:
    """What one simulated rank did in its steady-state step, beside the model's prediction."""

    rank: int
    coords: Dict[str, int]
    layout: str
    ops: List[Op]
    bytes: Dict[str, float]
    peak_memory_bytes: int
    state_memory_bytes: int  # live storages before the step: weights, gradient buffers, optimizer states
    checkpoint_bytes: int
    build_seconds: float
    step_seconds: float
    prediction: Prediction
    first_step_ops: List[Op] = field(default_factory=list)

    @property
    def num_ops(self) -> int:
        return len(self.ops)

    def to_dict(self) -> Dict[str, Any]:
        """The rank's entry of ``--report``."""
        return {
            "rank": self.rank,
            "coords": self.coords,
            "layout": self.layout,
            "bytes": self.bytes,
            "bytes_model": self.prediction.bytes,
            "peak_memory_bytes": self.peak_memory_bytes,
            "peak_memory_model_bytes": self.prediction.peak_memory_bytes,
            "checkpoint_bytes": self.checkpoint_bytes,
            "checkpoint_bytes_model": self.prediction.checkpoint_bytes,
            "num_ops": self.num_ops,
            "ops_by_kind": ops_by_kind(self.ops),
            "build_seconds": round(self.build_seconds, 3),
            "step_seconds": round(self.step_seconds, 3),
            "ops": [op.to_dict() for op in self.ops],
        }


def ops_by_kind(ops: List[Op]) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for op in ops:
        key = f"{op.kind}/{op.group_size}"
        out[key] = out.get(key, 0) + 1
    return out


class _Quiet:
    """The `MetricsLogger` seat of `ModelState`: a layout change message goes to stdout."""

    def message(self, text: str) -> None:
        print(text, flush=True)


def _data_on_disk(config: Any) -> bool:
    folders = config.data.train_folder
    paths = list(folders) if isinstance(folders, dict) else [folders] if folders else []
    return bool(paths) and all(os.path.isdir(str(p)) for p in paths)


def synthetic_batch(config: Any, step: int) -> List[Dict[str, Any]]:
    """``micro_num`` micro-batches of the loader's shapes (`collate` of ``micro_bsz`` packed windows of ``seq_len``
    tokens, two documents each) with synthetic token ids."""
    data, vocab = config.data, config.model_config.vocab_size
    rng = np.random.default_rng(step)
    batch = []
    for _ in range(data.micro_num):
        windows = [
            pack_window(
                rng.integers(0, vocab, data.seq_len + 1), np.array([data.seq_len // 2, data.seq_len]), data.seq_len
            )
            for _ in range(data.micro_bsz)
        ]
        batch.append(collate(windows))
    return batch


def _batches(phase: Phase, dp_rank: int, dp_size: int) -> List[List[Dict[str, Any]]]:
    config = phase.config
    if _data_on_disk(config):
        from internlm.data import build_train_loader

        loader = build_train_loader(config.data, config.seed, dp_rank, dp_size)
        return [loader.next_global_batch() for _ in range(STEPS)]
    return [synthetic_batch(config, step) for step in range(STEPS)]


def checkpoint_write_bytes(files: List[Any]) -> int:
    """Bytes of the tensors of ``(name, object)`` files as ``torch.save`` writes them: each storage once per file."""
    total = 0
    for _, obj in files:
        seen = set()
        for item in tree_flatten(obj)[0]:
            if isinstance(item, torch.Tensor):
                storage = item.untyped_storage()
                if id(storage) not in seen:
                    seen.add(id(storage))
                    total += storage.nbytes()
    return total


def checkpoint_write_bytes_of(model: ModelState, pc: Any) -> int:
    """Bytes this rank's files of a checkpoint save hold (`CheckpointManager.snapshot`'s writers): the model file's
    chunk state dicts on the data rank `model_writer_dp`, the optimizer's fp32 states (`optim_state_bytes`) on the
    first zero1 block. (The snapshot itself reads the update count back from the device, which fake tensors
    cannot.)"""
    total = 0
    writer = getattr(pc, "cp_rank", 0) == 0  # as CheckpointManager.snapshot: context ranks > 0 write nothing
    if writer and pc.dp_rank == model_writer_dp(pc.layout):
        total += checkpoint_write_bytes([("model", [chunk.state_dict() for chunk in model.chunks])])
    if writer and writes_optimizer_file(pc.layout, pc.dp_rank):
        total += model.optimizer.optim_state_bytes()
    return total


def join_fake_world(rank: int, world_size: int) -> None:
    """Make this process rank ``rank`` of a fake process group of ``world_size`` (leaving any earlier one)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)


def simulate_rank(phase: Phase, world_size: int, rank: int) -> RankResult:
    """Run `STEPS` training steps of ``phase`` as rank ``rank`` of ``world_size`` (module docstring)."""
    config, layout = phase.config, phase.layout
    join_fake_world(rank, world_size)
    memory, recorder = LiveStorages(), CommRecorder(active=False)
    start = time.perf_counter()
    pc = init_parallel_context(layout, rank)
    model = ModelState(pc, torch.device("meta"), _Quiet())  # meta: materialised below as fake CPU tensors
    model.enter(phase, init=False)  # the values are never read: no initialisation
    batches = _batches(phase, pc.dp_rank, pc.dp_size)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    device = torch.device("cpu")
    first_ops: List[Op] = []
    try:
        with mode, memory, recorder, kernel_backend("eager"):
            for chunk in model.chunks:
                chunk.to_empty(device=device)
            model.new_optimizer(phase)
            schedule = build_step_schedule(config, pc)
            build_seconds = time.perf_counter() - start
            runner = StepRunner(device)
            for step, batch in enumerate(batches):
                if step == STEPS - 1:
                    first_ops, recorder.ops = recorder.ops, []
                    state_bytes = memory.current
                    memory.reset_peak()
                    step_start = time.perf_counter()
                recorder.active = True
                tokens = sum(mb["label_tokens"] for mb in batch) * pc.dp_size
                runner.train_step(model, schedule, batch, config.adam.lr, config.adam.adam_beta2, tokens, step=step + 1)
                recorder.active = False
            step_seconds = time.perf_counter() - step_start
            peak = memory.peak
            model.optimizer.sync_params()
            ckpt = checkpoint_write_bytes_of(model, pc)
            model.close_optimizer()
    finally:
        dist.destroy_process_group()
    tp_rank, dp_rank, pp_rank = layout.coords(rank)
    coords = {"tensor": tp_rank, "data": dp_rank, "pipeline": pp_rank, "zero1": pc.zero1_rank}
    if layout.context > 1:
        coords["context"] = pc.cp_rank
    return RankResult(
        rank=rank,
        coords=coords,
        layout=layout.describe(),
        ops=recorder.ops,
        bytes=bytes_by_dimension(recorder.ops, pc),
        peak_memory_bytes=peak,
        state_memory_bytes=state_bytes,
        checkpoint_bytes=ckpt,
        build_seconds=build_seconds,
        step_seconds=step_seconds,
        prediction=predict(config, layout, pp_rank, dp_rank, pc.cp_rank),
        first_step_ops=first_ops,
    )


__all__ = ["RankResult", "STEPS", "simulate_rank", "synthetic_batch", "join_fake_world", "checkpoint_write_bytes"]
