"""Plot the training curves of one or several runs from their metrics.jsonl.

    python tools/plot_metrics.py work_dirs/demo --output curves.png
    python tools/plot_metrics.py work_dirs/tp2 work_dirs/pp2 --output compare.png     # compare layouts

Panels: training loss with validation loss (overall and per data folder when the run logged it), learning
rate, gradient norm, throughput (tokens per device per second), then one panel per evaluation task (the
``evaluation`` section's ``eval/<task>/<metric>`` records: accuracy and length-normalised accuracy with the chance
level dotted, or perplexity; docs/evaluation.md). Phase boundaries are dashed vertical lines
labelled with the phase name. Steps are the global optimizer steps, so the phases of a run follow each other.
A truncated last line (a run killed while appending) is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

EVAL_METRICS = ("acc", "acc_norm", "ppl")  # chance is drawn as a level, loss is ppl's logarithm
PANELS = (("loss", "loss"), ("lr", "learning rate"), ("grad_norm", "gradient norm"), ("tgs", "tokens / device / s"))


def read_records(work_dir: str) -> List[dict]:
    """The JSON records of ``work_dir/metrics.jsonl`` (a run folder or the file itself); bad lines are skipped."""
    path = work_dir if work_dir.endswith(".jsonl") else os.path.join(work_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no metrics.jsonl (is {work_dir!r} a run's work_dir?)")
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a half-written last line
    return records


def series(records: Sequence[dict], key: str) -> Tuple[List[int], List[float]]:
    """(steps, values) of every record holding a finite number under ``key``."""
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            steps.append(record["step"])
            values.append(float(value))
    return steps, values


def phase_starts(records: Sequence[dict]) -> List[Tuple[int, str]]:
    """``(first step, phase name)`` of every phase seen in the training records."""
    starts, seen = [], set()
    for record in records:
        name = record.get("phase")
        if "loss" in record and name is not None and name not in seen:
            seen.add(name)
            starts.append((record["step"], name))
    return starts


def eval_tasks(records: Sequence[dict]) -> Dict[str, List[str]]:
    """``{task: its plotted metrics}`` from the ``eval/<task>/<metric>`` keys, in first-seen order."""
    out: Dict[str, List[str]] = {}
    for record in records:
        for key in record:
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "eval" and parts[2] in EVAL_METRICS:
                metrics = out.setdefault(parts[1], [])
                if parts[2] not in metrics:
                    metrics.append(parts[2])
    return out


def validation_series(records: Sequence[dict]) -> Dict[str, Tuple[List[int], List[float]]]:
    """Validation curves: ``val_loss`` and, when logged, one per data folder (``val_loss_by_source``)."""
    out = {"validation": series(records, "val_loss")}
    for record in records:
        for source, value in (record.get("val_loss_by_source") or {}).items():
            steps, values = out.setdefault(f"validation {os.path.basename(os.path.normpath(source))}", ([], []))
            steps.append(record["step"])
            values.append(float(value))
    return {name: curve for name, curve in out.items() if curve[0]}


def _plot_task(ax, records: Sequence[dict], task: str, metrics: List[str], run: str, color: str) -> None:
    """One evaluation task's panel: its metrics over steps (acc solid, acc_norm dashed), the chance level dotted."""
    styles = {"acc": "o-", "acc_norm": "s--", "ppl": "o-"}
    for metric in metrics:
        steps, values = series(records, f"eval/{task}/{metric}")
        if steps:
            ax.plot(steps, values, styles[metric], color=color, ms=3, lw=1.2, label=f"{run} {metric}".strip())
    steps, chance = series(records, f"eval/{task}/chance")
    if chance:
        ax.axhline(chance[-1], color="gray", ls=":", lw=1, label=f"chance {chance[-1]:.3g}")
    if metrics == ["ppl"]:
        ax.set_yscale("log")
    ax.set_ylabel(f"{task}\n{'perplexity' if metrics == ['ppl'] else 'accuracy'}")


def plot(work_dirs: Sequence[str], output: str, title: Optional[str] = None) -> str:
    """Draw the panels for every run in ``work_dirs`` into the PNG ``output``; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [read_records(work_dir) for work_dir in work_dirs]
    tasks: Dict[str, List[str]] = {}
    for records in runs:
        for task, metrics in eval_tasks(records).items():
            tasks.setdefault(task, [])
            tasks[task] += [m for m in metrics if m not in tasks[task]]
    rows = len(PANELS) + len(tasks)
    fig, axes = plt.subplots(rows, 1, figsize=(10, 3 * rows), sharex=True, squeeze=False)
    axes = list(axes[:, 0])
    several = len(work_dirs) > 1
    for index, (work_dir, records) in enumerate(zip(work_dirs, runs)):
        run = os.path.basename(os.path.normpath(work_dir)) if several else ""
        color = f"C{index % 10}"
        for ax, (key, label) in zip(axes, PANELS):
            steps, values = series(records, key)
            if steps:
                name = f"{run} train".strip() if key == "loss" else run or None
                ax.plot(steps, values, color=color, lw=1.2, label=name)
            ax.set_ylabel(label)
        for ax, (task, metrics) in zip(axes[len(PANELS) :], tasks.items()):
            _plot_task(ax, records, task, metrics, run, color)
        for offset, (name, (steps, values)) in enumerate(validation_series(records).items()):
            axes[0].plot(
                steps, values, "o--", color=color, alpha=1.0 - 0.2 * min(offset, 3), ms=4, label=f"{run} {name}".strip()
            )
        for step, name in phase_starts(records)[1:]:
            for ax in axes:
                ax.axvline(step - 0.5, color=color, ls=":", lw=1)
            axes[0].annotate(name, (step, 1.0), xycoords=("data", "axes fraction"), va="top", fontsize=8, color=color)
    axes[-1].set_xlabel("step")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title or ", ".join(os.path.normpath(w) for w in work_dirs))
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work_dirs", nargs="+", metavar="WORK_DIR", help="run folders holding metrics.jsonl")
    parser.add_argument("--output", default="curves.png", help="PNG file to write (default: curves.png)")
    parser.add_argument("--title", default=None, help="figure title (default: the work_dirs)")
    args = parser.parse_args(argv)
    try:
        path = plot(args.work_dirs, args.output, args.title)
    except FileNotFoundError as exc:
        print(f"plot_metrics: error: {exc}", file=sys.stderr)
        return 2
    except ImportError:
        print("plot_metrics: error: matplotlib is not installed; pip install -e '.[plot]'", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
