"""Build the pieces of a training run from a resolved config and a parallel context.

Single-device and parallel runs share this path: the model is built on the meta device, split into
pipeline chunks, tensor-parallelised, then materialised and initialised (the same weights for every
layout, see `InternLM.init_weights`).
"""

from __future__ import annotations

from typing import Any, List

import torch
from torch import nn

from internlm.model import InternLM, InternLMConfig
from internlm.optim import HybridZeroOptimizer
from internlm.parallel import make_loss_fn, parallelize_model
from internlm.parallel.pipeline import build_pipeline_chunks, build_schedule

from .activation_checkpoint import apply_activation_checkpointing


def build_model_chunks(model_config: InternLMConfig, cfg: Any, pc: Any, device: torch.device) -> List[InternLM]:
    chunks = build_pipeline_chunks(model_config, pc.pp_rank, pc.pp_size, cfg.model.num_chunks, device="meta")
    for chunk in chunks:
        if pc.tp_size > 1:
            parallelize_model(chunk, pc)
        chunk.to_empty(device=device)
        chunk.init_weights(cfg.seed)
        apply_activation_checkpointing(chunk, cfg.model.checkpoint)
    return chunks


def build_optimizer(chunks: List[nn.Module], cfg: Any, pc: Any) -> HybridZeroOptimizer:
    return HybridZeroOptimizer.from_config(chunks, pc, cfg.adam, cfg.hybrid_zero_optimizer)


def build_loss_fn(cfg: Any, pc: Any):
    return make_loss_fn(pc, cfg.loss.label_smoothing)


def build_step_schedule(cfg: Any, pc: Any, model_config: InternLMConfig):
    return build_schedule(
        pc,
        num_chunks=cfg.model.num_chunks,
        micro_bsz=cfg.data.micro_bsz,
        seq_len=cfg.data.seq_len,
        hidden_size=model_config.hidden_size,
        dtype=model_config.dtype,
        overlap=cfg.parallel.pipeline.get("interleaved_overlap", False),
    )
