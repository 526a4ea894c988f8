"""Hybrid ZeRO stage 1 optimizer: flat buffers, sharded fp32 master weights and AdamW states, bucketed
overlapped gradient reduction, global-norm clipping. See docs/zero.md.

    opt = HybridZeroOptimizer(model_chunks, pc, lr=3e-4)
    opt.begin_step(num_micro_batches)
    ...  # forward/backward of every micro-batch
    grad_norm, skipped = opt.step()          # a StepResult: also .overflow, .nonfinite, .loss_scale

fp16 parameters take ``grad_scaler=DynamicGradScaler(...)``: multiply the loss by ``opt.loss_scale`` before backward.
"""

from .flat_buffer import BufferKey, FlatBuffer
from .grad_norm import global_grad_norm
from .grad_scaler import DynamicGradScaler
from .hybrid_zero import HybridZeroOptimizer
from .step_result import StepResult

__all__ = ["HybridZeroOptimizer", "StepResult", "DynamicGradScaler", "FlatBuffer", "BufferKey", "global_grad_norm"]
