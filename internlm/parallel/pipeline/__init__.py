"""Pipeline parallelism: stage partition, point-to-point transfers, 1F1B and interleaved schedules.

    from internlm.parallel.pipeline import build_pipeline_chunks, build_schedule
    chunks = build_pipeline_chunks(config, pc.pp_rank, pc.pp_size, num_chunks)   # on meta
    for c in chunks: c.to_empty(device="cuda"); c.init_weights(seed)
    schedule = build_schedule(pc, num_chunks, micro_bsz, seq_len, config.hidden_size, config.dtype, overlap)
    loss = schedule.forward_backward(chunks, micro_batches, loss_fn, loss_scale)

See docs/pipeline.md.
"""

from .interleaved import InterleavedSchedule
from .p2p import Exchange, PipelineP2P, ring_neighbours
from .partition import build_pipeline_chunks, partition_layers, pipeline_problems
from .schedules import NoPipelineSchedule, OneFOneBSchedule, build_schedule, schedule_order

__all__ = [
    "partition_layers",
    "pipeline_problems",
    "build_pipeline_chunks",
    "PipelineP2P",
    "Exchange",
    "ring_neighbours",
    "NoPipelineSchedule",
    "OneFOneBSchedule",
    "InterleavedSchedule",
    "build_schedule",
    "schedule_order",
]
