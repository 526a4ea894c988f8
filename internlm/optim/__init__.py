"""Hybrid ZeRO stage 1 optimizer: flat buffers, sharded fp32 master weights and AdamW states, bucketed
overlapped gradient reduction, global-norm clipping. See docs/zero.md.

    opt = HybridZeroOptimizer(model_chunks, pc, lr=3e-4)
    opt.begin_step(num_micro_batches)
    ...  # forward/backward of every micro-batch
    grad_norm, skipped = opt.step()
"""

from .flat_buffer import BufferKey, FlatBuffer
from .grad_norm import global_grad_norm
from .hybrid_zero import HybridZeroOptimizer

__all__ = ["HybridZeroOptimizer", "FlatBuffer", "BufferKey", "global_grad_norm"]
