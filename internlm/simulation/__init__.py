"""The cluster in one process: the real training step of chosen ranks on a fake process group and fake tensors.

    recorder        `CommRecorder`: every collective and point-to-point op (kind, group, bytes, peer, shape, dtype)
    live_memory     `LiveStorages`: the peak of live tensor storages (real or fake)
    prediction      the planner's figures for one rank (`internlm.planning`)
    rank_step       `simulate_rank`: two steps of one rank through `ModelState` and `StepRunner`
    pipeline_check  sends of each rank against its peer's receives (a mismatch is a deadlock)
    report          the printed tables and the ``--report`` JSON
    run             `run_simulation`: what ``train.py --simulate`` runs

The package sits above `internlm.train` (it runs the Trainer's collaborators); nothing below imports it.
"""

from .live_memory import LiveStorages
from .pipeline_check import check_pipeline
from .rank_step import RankResult, simulate_rank
from .recorder import CommRecorder, Op, bytes_by_dimension, dimension_of
from .run import default_ranks, parse_ranks, run_simulation

__all__ = [
    "LiveStorages",
    "check_pipeline",
    "RankResult",
    "simulate_rank",
    "CommRecorder",
    "Op",
    "bytes_by_dimension",
    "dimension_of",
    "default_ranks",
    "parse_ranks",
    "run_simulation",
]
