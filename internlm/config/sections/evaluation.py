"""The ``evaluation`` section: downstream tasks scored inside the training loop (docs/evaluation.md).

evaluation = dict(
    every=50,
    tasks=[
        dict(name="next_line", kind="multiple_choice", path="data/next_line.jsonl"),
        dict(name="heldout", kind="perplexity", path="data/heldout.jsonl"),
    ],
)
"""

import dataclasses
from typing import Annotated, Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..keys import key, section

TASK_KINDS = ("multiple_choice", "perplexity")
# every key a task dict may hold, with its default (None: required)
TASK_KEYS: Dict[str, Any] = dict(
    name=None, kind="multiple_choice", path=None, num_fewshot=0, fewshot_path=None, limit=None
)


def _task(index: int, value: Any) -> Dict[str, Any]:
    """One task dict checked and completed with the defaults of `TASK_KEYS`."""
    if not isinstance(value, Mapping):
        raise ValueError(f"tasks[{index}] must be a dict(name=..., kind=..., path=...), got {type(value).__name__}")
    unknown = sorted(set(value) - set(TASK_KEYS))
    if unknown:
        raise ValueError(
            f"tasks[{index}]: unknown key(s) {', '.join(map(repr, unknown))}; keys: {', '.join(TASK_KEYS)}"
        )
    task = {k: value.get(k, default) for k, default in TASK_KEYS.items()}
    for required in ("name", "path"):
        if not isinstance(task[required], str) or not task[required]:
            raise ValueError(f"tasks[{index}].{required} must be a non-empty string")
    if "/" in task["name"] or " " in task["name"]:
        raise ValueError(f"tasks[{index}].name {task['name']!r} must hold no '/' or space (it names metrics)")
    if task["kind"] not in TASK_KINDS:
        raise ValueError(f"tasks[{index}].kind {task['kind']!r} must be one of {', '.join(TASK_KINDS)}")
    if not isinstance(task["num_fewshot"], int) or task["num_fewshot"] < 0:
        raise ValueError(f"tasks[{index}].num_fewshot must be an int >= 0")
    if task["num_fewshot"] and task["kind"] != "multiple_choice":
        raise ValueError(f"tasks[{index}].num_fewshot applies to multiple_choice tasks only")
    if task["limit"] is not None and (not isinstance(task["limit"], int) or task["limit"] < 1):
        raise ValueError(f"tasks[{index}].limit must be None or an int >= 1")
    return task


def tasks(value: Sequence[Any]) -> Tuple[Dict[str, Any], ...]:
    """The ``tasks`` list checked: each a dict of `TASK_KEYS`, names unique."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError("must be a list of task dicts")
    out = tuple(_task(i, v) for i, v in enumerate(value))
    names = [t["name"] for t in out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"task names must be unique: {', '.join(duplicates)} repeated")
    return out


@section("evaluation")
@dataclasses.dataclass(frozen=True)
class EvaluationSection:
    """Tasks scored with the model in place during training (multiple-choice log-likelihood and perplexity, from
    local jsonl files; format in docs/evaluation.md). Scores go to metrics.jsonl (``eval/<task>/<metric>``),
    TensorBoard, the console and tools/plot_metrics.py."""

    every: Annotated[int, key(0, "evaluate every this many global steps; 0: only at_start / at_phase_end", minimum=0)]
    at_start: Annotated[bool, key(True, "evaluate before the first step of a run from scratch (global step 0)")]
    at_phase_end: Annotated[bool, key(True, "evaluate after the last step of every phase")]
    tasks: Annotated[
        List[Dict[str, Any]],
        key(
            [],
            "the tasks: dicts of name (metrics prefix), kind (multiple_choice or perplexity), path (jsonl), "
            "num_fewshot (0), fewshot_path (None: the first lines of path, which are then not scored), limit "
            "(None: every line); empty: no evaluation",
            normalize=tasks,
            accepts=(list, tuple),
        ),
    ]
    prepare_demo_tasks: Annotated[
        Optional[str],
        key(
            None,
            "a folder to write the demo tasks into before training (next_line.jsonl, heldout_docs.jsonl, "
            "heldout_code.jsonl), built from the held-out tail of data.demo_cache_dir's corpus; None: none",
        ),
    ]


__all__ = ["EvaluationSection", "TASK_KEYS", "TASK_KINDS"]
