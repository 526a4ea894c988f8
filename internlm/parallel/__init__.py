"""Parallelism for InternLM: the process-group grid, tensor / sequence parallel layers, vocab-parallel loss.

    layout = Layout.create(world_size, tensor=2, pipeline=2)     # or RunConfig.layout(world_size)
    pc = init_parallel_context(layout, rank)                     # after dist.init_process_group
    model = parallelize_model(InternLM(config), pc)              # this rank's tensor shard
    shards = param_shards(model)                                 # name -> TPShard, for init, optimizer, checkpoints
    loss_fn = make_loss_fn(pc, label_smoothing)                  # sum of token losses, vocab-split logits

The pipeline schedules live in `internlm.parallel.pipeline` (imported separately).
See docs/parallel.md.
"""

from .comm import (
    all_reduce_,
    copy_to_tensor_region,
    gather_from_sequence_region,
    group_rank,
    group_size,
    reduce_from_tensor_region,
    reduce_scatter_to_sequence_region,
    scatter_to_sequence_region,
)
from .cross_entropy import LossFn, make_loss_fn, vocab_parallel_cross_entropy
from .layout import Layout, kv_heads_supported, tensor_split_problems
from .parallelize import parallelize_model
from .process_groups import ParallelContext, describe_groups, init_parallel_context
from .tensor_parallel import (
    ColumnParallelLinear,
    ReplicatedKVLinear,
    RowParallelLinear,
    TensorParallelRMSNorm,
    VocabParallelEmbedding,
)
from .tp_shard import TPShard, declare_shards, param_shards

__all__ = [
    "Layout",
    "ParallelContext",
    "init_parallel_context",
    "describe_groups",
    "tensor_split_problems",
    "kv_heads_supported",
    "TPShard",
    "declare_shards",
    "param_shards",
    "group_size",
    "group_rank",
    "all_reduce_",
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
    "LossFn",
]
