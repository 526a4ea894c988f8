"""Evaluation during and after pretraining (docs/evaluation.md).

* `tasks`: the task files (jsonl: multiple-choice items, perplexity texts) and their tokenized requests.
* `spans`: requests as scored spans packed into the trainer's micro-batch shape.
* `evaluator`: `Evaluator`, run by the trainer every ``evaluation.every`` steps through the pipeline schedule.
* `demo_tasks`: the demo's tasks, built from the held-out tail of the demo corpus.
* `harness`: the lm-evaluation-harness model class ``internlm`` (needs the ``eval`` extra).
"""
