"""Build the pieces of a training run from a phase's typed config and a parallel context.

Single-device and parallel runs share this path: the model is built on the meta device, split into
pipeline chunks, tensor-parallelised, then materialised and initialised (the same weights for every
layout, see `InternLM.init_weights`).
"""

from __future__ import annotations

from typing import List, Optional

import torch

from internlm.config import RunConfig
from internlm.model import InternLM
from internlm.optim import DynamicGradScaler, HybridZeroOptimizer
from internlm.parallel import LossFn, ParallelContext, make_loss_fn, parallelize_model, param_shards
from internlm.parallel.pipeline import build_pipeline_chunks, build_schedule

from .activation_checkpoint import apply_activation_checkpointing, compile_layers


def build_model_chunks(
    config: RunConfig, pc: ParallelContext, device: torch.device, init: bool = True
) -> List[InternLM]:
    """This rank's model chunks (pipeline stage, tensor shard), initialised with the layout-independent weights.

    Built on the meta device, then materialised (``to_empty``) and initialised shard by shard: each rank draws
    only the initial values of the pieces it holds (`InternLM.init_weights`). ``init=False`` skips the random
    initialisation (the values are left uninitialised) for chunks that a checkpoint is about to overwrite.
    Then, per chunk: ``model.fused_loss`` makes the chunk holding the head return a `HeadInput` (the loss of
    `build_loss_fn` applies the head chunk by chunk), ``model.checkpoint`` wraps layers (or their attention cores
    or MLPs) in activation checkpointing, and ``model.compile`` compiles every decoder layer.
    """
    chunks = build_pipeline_chunks(config.model_config, pc.pp_rank, pc.pp_size, config.model.num_chunks, device="meta")
    for chunk in chunks:
        parallelize_model(chunk, pc)
        chunk.to_empty(device=device)
        if init:
            chunk.init_weights(config.seed, param_shards(chunk))
        if chunk.lm_head is not None:
            chunk.fuse_head_loss = config.model.fused_loss  # return HeadInput: the loss applies the head, chunked
        apply_activation_checkpointing(chunk, config.model.checkpoint)
        if config.model.compile:
            compile_layers(chunk)
    return chunks


def build_grad_scaler(config: RunConfig, device: torch.device) -> Optional[DynamicGradScaler]:
    """The dynamic loss scaler of the ``grad_scaler`` section when model.dtype is torch.float16, else None."""
    if config.model_config.dtype != torch.float16:
        return None
    scaler = config.grad_scaler
    return DynamicGradScaler(
        initial_scale=scaler.fp16.initial_scale,
        min_scale=scaler.fp16.min_scale,
        growth_interval=scaler.fp16.growth_interval,
        growth_factor=scaler.growth_factor,
        backoff_factor=scaler.backoff_factor,
        max_scale=scaler.max_scale,
        hysteresis=scaler.hysteresis,
        device=device,
    )


def build_optimizer(chunks: List[InternLM], config: RunConfig, pc: ParallelContext) -> HybridZeroOptimizer:
    """The hybrid ZeRO optimizer over ``chunks`` with the ``adam`` and ``hybrid_zero_optimizer`` sections (and
    the ``grad_scaler`` section's dynamic loss scaling for fp16)."""
    adam, zero = config.adam, config.hybrid_zero_optimizer
    device = next(p.device for chunk in chunks for p in chunk.parameters())
    return HybridZeroOptimizer(
        chunks,
        pc,
        lr=adam.lr,
        betas=(adam.adam_beta1, adam.adam_beta2),
        eps=adam.adam_eps,
        weight_decay=adam.weight_decay,
        clip_grad_norm=zero.clip_grad_norm,
        reduce_bucket_size=zero.reduce_bucket_size,
        overlap_sync_grad=zero.overlap_sync_grad,
        overlap_sync_param=zero.overlap_sync_param,
        grad_scaler=build_grad_scaler(config, device),
    )


def build_loss_fn(config: RunConfig, pc: ParallelContext) -> LossFn:
    return make_loss_fn(pc, config.loss.label_smoothing)


def build_step_schedule(config: RunConfig, pc: ParallelContext):
    """The pipeline schedule of a phase (its seq_len and micro_bsz size the stage-to-stage messages)."""
    return build_schedule(
        pc,
        num_chunks=config.model.num_chunks,
        micro_bsz=config.data.micro_bsz,
        seq_len=config.data.seq_len,
        hidden_size=config.model_config.hidden_size,
        dtype=config.model_config.dtype,
        overlap=config.parallel.pipeline.interleaved_overlap,
    )
