"""Parallelism for InternLM: the process-group grid, tensor / sequence parallel layers, vocab-parallel loss.

    pc = init_parallel_context(cfg.parallel, world_size, rank)   # after dist.init_process_group
    model = parallelize_model(InternLM(config), pc)              # this rank's tensor shard
    loss_fn = make_loss_fn(pc, label_smoothing)                  # sum of token losses, vocab-split logits

The pipeline schedules live in `internlm.parallel.pipeline` (imported separately).
See docs/parallel.md.
"""

from .comm import (
    copy_to_tensor_region,
    gather_from_sequence_region,
    reduce_from_tensor_region,
    reduce_scatter_to_sequence_region,
    scatter_to_sequence_region,
)
from .cross_entropy import make_loss_fn, vocab_parallel_cross_entropy
from .layout import kv_heads_supported, model_tensor_problems, tensor_layout_problems
from .parallelize import parallelize_model
from .process_groups import (
    ParallelContext,
    describe_layout,
    group_ranks,
    init_parallel_context,
    parse_parallel_sizes,
)
from .tensor_parallel import (
    ColumnParallelLinear,
    TensorParallelRMSNorm,
    ReplicatedKVLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)

__all__ = [
    "ParallelContext",
    "init_parallel_context",
    "parse_parallel_sizes",
    "group_ranks",
    "describe_layout",
    "tensor_layout_problems",
    "model_tensor_problems",
    "kv_heads_supported",
    "copy_to_tensor_region",
    "reduce_from_tensor_region",
    "scatter_to_sequence_region",
    "gather_from_sequence_region",
    "reduce_scatter_to_sequence_region",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "ReplicatedKVLinear",
    "TensorParallelRMSNorm",
    "parallelize_model",
    "vocab_parallel_cross_entropy",
    "make_loss_fn",
]
