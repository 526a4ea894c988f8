"""The in-loop evaluator through train.py: it leaves training unchanged (per-step losses equal those of a run
without evaluation) and scores alike under tensor x pipeline parallelism, context parallelism and one process."""

import math

import pytest

from conftest import STEPS, evaluation_sets, train_run
from train_utils import read_metrics, step_losses


def _evals(work_dir: str) -> dict:
    return {r["step"]: r for r in read_metrics(work_dir) if any(k.startswith("eval/") for k in r)}


def test_evaluation_leaves_training_unchanged(single_eval_run, tmp_path_factory, demo_data):
    plain = train_run(tmp_path_factory.mktemp("no_eval"), demo_data, 1, [])
    assert step_losses(single_eval_run) == step_losses(plain)  # bit-equal: no RNG, mode or gradient changed
    evals = _evals(single_eval_run)
    assert sorted(evals) == list(range(0, STEPS + 1))  # at_start, then every step
    for record in evals.values():
        assert 0.0 <= record["eval/mc/acc"] <= 1.0 and record["eval/mc/chance"] == 0.25
        assert math.isclose(record["eval/ppl/ppl"], math.exp(record["eval/ppl/loss"]))
    assert evals[STEPS]["eval/ppl/loss"] < evals[0]["eval/ppl/loss"]  # it learns the corpus


@pytest.mark.parametrize(
    "name, procs, layout",
    [("tp2_pp2", 4, ["parallel.tensor=2", "parallel.pipeline.size=2"]), ("cp2_ring", 2, ["parallel.context=2"])],
)
def test_parallel_scores_equal_one_process(
    single_eval_run, tmp_path_factory, demo_data, eval_tasks, name, procs, layout
):
    sets = [*layout, *evaluation_sets(eval_tasks, 1)]
    parallel = _evals(train_run(tmp_path_factory.mktemp(f"eval_{name}"), demo_data, procs, sets))
    single = _evals(single_eval_run)
    assert sorted(parallel) == sorted(single)
    for step, record in single.items():
        assert parallel[step]["eval/mc/acc"] == record["eval/mc/acc"], step
        assert parallel[step]["eval/mc/acc_norm"] == record["eval/mc/acc_norm"], step
        assert math.isclose(parallel[step]["eval/ppl/loss"], record["eval/ppl/loss"], rel_tol=1e-4), step
