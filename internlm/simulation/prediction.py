"""The planner's figures for one simulated rank (`internlm.planning`), in the units the simulation measures.

bytes              `step_communication`: bytes sent per step per dimension
peak_memory_bytes  `stage_memory` of the rank's pipeline stage: weights + gradients + optimizer + the peak of
                   activations and transient, with the attention backend a CPU run resolves (the simulation
                   runs on fake CPU tensors)
checkpoint_bytes   this rank's share of `checkpoint_bytes`: the model of its (tensor, pipeline) shard
                   (`stage_params`) on the data rank that writes the model files, the optimizer states of its
                   zero1 slice on the first zero1 block (`CheckpointManager.snapshot`'s writers)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

from internlm.checkpoint.files import model_writer_dp
from internlm.model.attention import resolve_backend
from internlm.planning import checkpoint_bytes, stage_memory, stage_params, step_communication


@dataclass
class Prediction:
    bytes: Dict[str, float]
    peak_memory_bytes: float
    memory: Dict[str, float]
    checkpoint_bytes: float


def predict(config: Any, layout: Any, pp_rank: int, dp_rank: int, cp_rank: int = 0) -> Prediction:
    """The planner's figures for the rank at pipeline rank ``pp_rank``, data rank ``dp_rank``, context rank
    ``cp_rank`` of ``layout``."""
    mc, data, checkpoint = config.model_config, config.data, config.model.checkpoint
    comm = step_communication(mc, layout, data.micro_bsz, data.seq_len, data.micro_num, checkpoint, pp_rank)
    backend = resolve_backend(mc.attn_backend, "cpu", mc.dtype, flash_installed=False)
    memory = stage_memory(
        mc,
        layout,
        data.micro_bsz,
        data.seq_len,
        data.micro_num,
        checkpoint,
        pp_rank,
        backend,
        config.model.fused_loss,
        attn_device="cpu",
    )
    # `checkpoint_bytes` per parameter, for the parameters of this rank's stage (the first and last hold more)
    ckpt, params = checkpoint_bytes(mc), stage_params(mc, layout, pp_rank)
    written = 0.0
    writer = cp_rank == 0  # context ranks > 0 hold copies and write nothing
    if writer and dp_rank == model_writer_dp(layout):
        written += ckpt["model"] / mc.num_params() * params
    if writer and dp_rank < layout.zero1:
        written += ckpt["optimizer"] / mc.num_params() * params / layout.zero1
    return Prediction(
        bytes={
            "tensor": comm.tensor,
            "pipeline": comm.pipeline,
            "data_gradients": comm.data_gradients,
            "data_params": comm.data_params,
            "context": comm.context,
        },
        peak_memory_bytes=memory.total,
        memory=memory.as_dict(),
        checkpoint_bytes=written,
    )


__all__ = ["Prediction", "predict"]
