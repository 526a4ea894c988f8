"""`train.py --simulate`: the listed ranks of a world, one after another in this process (`simulate_rank`)."""

from __future__ import annotations

from typing import List, Optional, Sequence

from internlm.train.phases import Phase

from .pipeline_check import check_pipeline
from .rank_step import RankResult, simulate_rank
from .report import disagreements, rank_table, write_report


def default_ranks(layout) -> List[int]:
    """The first rank of the first, a middle and the last pipeline stage (duplicates dropped)."""
    stages = sorted({0, layout.pipeline // 2, layout.pipeline - 1})
    return [layout.rank_of(0, 0, stage) for stage in stages]


def parse_ranks(text: Optional[str], world_size: int) -> Optional[List[int]]:
    """``--ranks 0,5,7`` as a list (None when not given); raises ValueError naming the flag."""
    if not text:
        return None
    try:
        ranks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--ranks {text!r}: give comma-separated integers, e.g. --ranks 0,7") from None
    bad = [r for r in ranks if not 0 <= r < world_size]
    if bad or not ranks:
        raise ValueError(f"--ranks {text!r}: ranks must lie in [0, {world_size}) for --world-size {world_size}")
    return ranks


def run_simulation(phases: Sequence[Phase], world_size: int, ranks: Optional[List[int]], report: Optional[str]) -> int:
    """Simulate the first phase's step on ``ranks`` (default `default_ranks`), print the tables, write the JSON
    report; returns 0, or 1 when the pipeline's sends and receives do not match (a deadlock on a cluster)."""
    phase = phases[0]
    ranks = ranks if ranks is not None else default_ranks(phase.layout)
    print(
        f"simulating {phase.config_file} on a fake world of {world_size}: ranks {ranks} "
        f"(fake process group, fake CPU tensors in {phase.config.model_config.dtype})",
        flush=True,
    )
    results: List[RankResult] = []
    for rank in ranks:
        result = simulate_rank(phase, world_size, rank)
        results.append(result)
        print(rank_table(result), flush=True)
    for line in [d for r in results for d in disagreements(r)]:
        print(f"disagreement: {line}")
    status = 0
    problems = check_pipeline(results, phase.layout)
    for problem in problems:
        print(f"deadlock: {problem}")
        status = 1
    if report:
        write_report(report, world_size, results)
        print(f"report written to {report}")
    return status


__all__ = ["default_ranks", "parse_ranks", "run_simulation"]
