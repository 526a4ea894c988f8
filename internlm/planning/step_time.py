"""Step time of a layout: compute, pipeline bubble and communication per optimizer step, and the MFU it gives.

An estimate, with these assumptions:

    compute    the slowest pipeline stage's FLOPs (`stage_flops_per_token`: its layers as `partition_layers`
               gives them, at (F - 6 V H) / L FLOPs per layer and token, where F is
               ``InternLMConfig.flops_per_token`` (6 N + attention), plus the head's 6 V H on the last stage, plus
               one more forward of what is recomputed: a recomputed layer 1/3 of its FLOPs, ``"attn"``
               attention's core 2 S H per layer and token, ``"mlp"`` the MLP matmuls 6 H F; a fraction counts
               ``round(f x layers)`` of each chunk, as the runtime wraps them) x the data rank's tokens / (tensor
               x context),
               at ``mfu_cap`` (default 50%) of the device's dense bf16 peak. Every stage waits for the slowest
               one, so an uneven split (82 layers over 8 virtual stages) or the head costs step time
    bubble     (pipeline - 1) / (chunks x micro_num) x compute (1F1B and interleaved schedules)
    tensor     tensor-parallel bytes / intra-node bandwidth (inter-node when tensor > GPUs per node): not
               overlapped, the collectives sit between the matmuls
    context    context-parallel bytes (ring sends or all-to-alls) / intra-node bandwidth (inter-node when tensor x
               context exceeds a node): not overlapped (ring attention overlaps them with the blocks' attention
               in practice, so this is an upper bound)
    pipeline   pipeline bytes / the bandwidth of the link between stages (intra-node when tensor x data x
               pipeline fits a node): not overlapped
    data       zero1 reduce-scatter and parameter all-gather over the zero1 group (intra-node when tensor x
               zero1 fits a node), replica all-reduce across zero1 blocks (inter-node unless the whole
               data-parallel group fits a node); overlapped with compute (gradients with the backward, 2/3 of
               compute; the gather with the next forward, 1/3), only the excess is counted
    step       compute + bubble + tensor + context + pipeline + exposed data;  MFU = model FLOPs / (step x peak)

Bytes come from `internlm.planning.communication.step_communication`; bandwidths are effective per-GPU bus
bandwidths of NCCL collectives, assumed per device type (`internlm.planning.devices`) unless given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from internlm.parallel.pipeline.partition import partition_layers

from .communication import StepCommunication, step_communication
from .devices import Device
from .memory import peak_stage
from .params import dtype_bytes
from .recompute import Checkpoint, checkpointed_layer_count


@dataclass(frozen=True)
class Batch:
    """The batch shape of one optimizer step on one data-parallel rank."""

    micro_bsz: int
    micro_num: int
    seq_len: int


@dataclass(frozen=True)
class Hardware:
    """What the step time assumes of the machines: the device, the fraction of peak the matmuls reach, GPUs per
    node and the per-GPU collective bandwidths in GB/s (0: the device's assumed figures)."""

    device: Device
    mfu_cap: float = 0.5
    gpus_per_node: int = 8
    intra_bw: float = 0.0
    inter_bw: float = 0.0

    @property
    def intra(self) -> float:
        return self.intra_bw or self.device.intra_bw

    @property
    def inter(self) -> float:
        return self.inter_bw or self.device.inter_bw


@dataclass
class Estimate:
    """One layout's plan: peak memory of the most loaded pipeline rank, step time by component, communication."""

    layout: Any
    batch: Batch
    checkpoint: Checkpoint
    memory: Dict[str, float]
    pipeline_rank: int  # the most loaded pipeline rank (largest memory total)
    params: int  # parameters one device of that rank holds
    times: Dict[str, float]
    comm: StepCommunication
    fused_loss: bool = True  # model.fused_loss, as the memory was counted

    @property
    def step(self) -> float:
        return self.times["step"]


def stage_flops_per_token(model_config: Any, layout: Any, checkpoint: Checkpoint, seq_len: int) -> List[float]:
    """Training FLOPs per token of the whole tensor group of each pipeline rank (recomputation included), as the
    module docstring's ``compute`` counts them; without recomputation they sum to ``flops_per_token``."""
    mc = model_config
    head = 6.0 * mc.vocab_size * mc.hidden_size
    layer = (mc.flops_per_token(seq_len) - head) / mc.num_layers
    if checkpoint == "attn":
        selective = 2.0 * seq_len * mc.hidden_size
    elif checkpoint == "mlp":
        selective = 6.0 * mc.hidden_size * mc.intermediate_size
    else:
        selective = 0.0
    pp, chunks = layout.pipeline, layout.num_chunks
    out = []
    for rank, ranges in enumerate(partition_layers(mc.num_layers, pp, chunks)):
        flops = 0.0
        for c, layers in enumerate(ranges):
            recomputed = checkpointed_layer_count(checkpoint, len(layers))
            flops += len(layers) * (layer + selective) + recomputed * layer / 3
            if c * pp + rank == pp * chunks - 1:
                flops += head
        out.append(flops)
    return out


def _same_node(span: int, gpus_per_node: int) -> bool:
    return span <= gpus_per_node


def step_time(
    model_config: Any, layout: Any, batch: Batch, checkpoint: Checkpoint, hardware: Hardware
) -> Tuple[Dict[str, float], StepCommunication]:
    """Seconds per step by component (see the module docstring), tokens per device per second, MFU; and the
    `StepCommunication` they come from."""
    mc, hw = model_config, hardware
    comm = step_communication(mc, layout, batch.micro_bsz, batch.seq_len, batch.micro_num, checkpoint)
    tokens = layout.data * batch.micro_bsz * batch.micro_num * batch.seq_len
    flops = mc.flops_per_token(batch.seq_len) * tokens / layout.world_size
    peak = hw.device.peak_tflops * 1e12
    replica_tokens = batch.micro_bsz * batch.micro_num * batch.seq_len  # one data rank's tokens
    slowest = max(stage_flops_per_token(mc, layout, checkpoint, batch.seq_len))
    cp = getattr(layout, "context", 1)
    compute = slowest * replica_tokens / (layout.tensor * cp) / (peak * hw.mfu_cap)
    bubble = (layout.pipeline - 1) / (layout.num_chunks * batch.micro_num) * compute if layout.pipeline > 1 else 0.0
    gb, nodes = 1e9, hw.gpus_per_node
    tp_bw = hw.intra if _same_node(layout.tensor, nodes) else hw.inter
    pp_bw = hw.intra if _same_node(layout.tensor * cp * layout.data * layout.pipeline, nodes) else hw.inter
    cp_bw = hw.intra if _same_node(layout.tensor * cp, nodes) else hw.inter
    tensor = comm.tensor / (tp_bw * gb)
    context = comm.context / (cp_bw * gb)
    pipeline = comm.pipeline / (pp_bw * gb)
    # split the data-parallel bytes by link: zero1 group (stride tensor) and the replica all-reduce
    z, r = layout.zero1, layout.data // layout.zero1 * cp
    params = comm.data_params / (dtype_bytes(mc.dtype) * (z - 1) / z) if z > 1 else 0.0
    replica = comm.data_gradients - ((z - 1) / z * 4 * params if z > 1 else 0.0)
    zero1_bw = hw.intra if _same_node(layout.tensor * cp * z, nodes) else hw.inter
    replica_bw = hw.intra if _same_node(layout.tensor * cp * layout.data, nodes) else hw.inter
    grads = (comm.data_gradients - replica) / (zero1_bw * gb) + (replica / (replica_bw * gb) if r > 1 else 0.0)
    gather = comm.data_params / (zero1_bw * gb)
    data_exposed = max(0.0, grads - 2 / 3 * compute) + max(0.0, gather - compute / 3)
    step = compute + bubble + tensor + context + pipeline + data_exposed
    times = dict(
        compute=compute,
        bubble=bubble,
        tensor=tensor,
        context=context,
        pipeline=pipeline,
        data=grads + gather,
        data_exposed=data_exposed,
        step=step,
        tokens_per_device_s=tokens / layout.world_size / step,
        mfu=flops / (step * peak),
    )
    return times, comm


def estimate(
    model_config: Any,
    layout: Any,
    batch: Batch,
    checkpoint: Checkpoint,
    hardware: Hardware,
    attn_backend: Optional[str] = None,
    fused_loss: bool = True,
) -> Estimate:
    """Memory (`peak_stage`) and step time (`step_time`) of one layout, batch and ``model.checkpoint`` setting
    (``fused_loss``: ``model.fused_loss``)."""
    b = batch
    stage = peak_stage(model_config, layout, b.micro_bsz, b.seq_len, b.micro_num, checkpoint, attn_backend, fused_loss)
    times, comm = step_time(model_config, layout, batch, checkpoint, hardware)
    return Estimate(
        layout, batch, checkpoint, stage.as_dict(), stage.pipeline_rank, stage.params, times, comm, fused_loss
    )


__all__ = ["Batch", "Hardware", "Estimate", "stage_flops_per_token", "step_time", "estimate"]
