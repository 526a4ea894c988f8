"""`Evaluator`: the ``evaluation`` section's tasks scored with the model in place, during training.

It runs through the trainer's own path for validation: the phase's pipeline schedule, forward only, on micro-batches
of the training shape (`spans`), so it works under every layout the schedule does (tensor, sequence, pipeline and
data parallel). Per-span log-likelihoods land on the last pipeline stage; one sum over the pipeline and data
groups gives every rank all of them. The chunks' train/eval modes and the RNG states are restored afterwards; no
gradient is computed (``torch.no_grad``), so the optimizer state and ``.grad`` are untouched.

Scores (multiple choice, as lm-evaluation-harness's ``multiple_choice``; ``ll_i``: the choice's summed log-likelihood,
``len_i``: its length in characters):

    acc      = mean over items of [argmax_i ll_i == gold]
    acc_norm = mean over items of [argmax_i ll_i / len_i == gold]
    chance   = mean over items of 1 / (number of choices)

perplexity: ``loss = sum of token NLL / tokens`` (nats per token), ``ppl = exp(loss)``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from internlm.parallel import all_reduce_

from .demo_tasks import build_demo_tasks
from .spans import Span, SpanLoss, choice_span, pack_spans, padding_batch, text_spans
from .tasks import choice_task_items, encode_pair, text_task_texts


@dataclass
class TaskPlan:
    """A task's spans: ``first`` is its first span's index in the run's span list; multiple choice keeps, per item,
    its number of choices, the choices' character lengths and the gold index; perplexity its token count."""

    task: Dict[str, Any]
    first: int
    spans: List[Span]
    items: List[Tuple[int, List[int], int]]
    tokens: int = 0


def plan_tasks(tasks: Tuple[Dict[str, Any], ...], tokenizer: Any, seq_len: int) -> List[TaskPlan]:
    """Tokenize every task into spans (`spans.choice_span` / `spans.text_spans`)."""
    plans, first = [], 0
    for task in tasks:
        spans: List[Span] = []
        items: List[Tuple[int, List[int], int]] = []
        tokens = 0
        if task["kind"] == "multiple_choice":
            choice_items, prefix = choice_task_items(task)
            for number, item in enumerate(choice_items, 1):
                for choice in item.choices:
                    ctx, cont = encode_pair(tokenizer.encode, tokenizer.eos_id, prefix + item.context, choice)
                    spans.append(choice_span(ctx, cont, seq_len, f"{task['path']} item {number}"))
                items.append((len(item.choices), [len(c) for c in item.choices], item.gold))
        else:
            for text in text_task_texts(task):
                ids = tokenizer.encode(text)
                spans += text_spans(ids, tokenizer.eos_id, seq_len)
                tokens += len(ids)
        plans.append(TaskPlan(task, first, spans, items, tokens))
        first += len(spans)
    return plans


def score_tasks(plans: List[TaskPlan], nll: List[float]) -> Dict[str, Dict[str, float]]:
    """``{task name: {metric: value}}`` from every span's summed NLL (formulas in the module docstring)."""
    out: Dict[str, Dict[str, float]] = {}
    for plan in plans:
        values = nll[plan.first : plan.first + len(plan.spans)]
        if plan.task["kind"] == "perplexity":
            loss = sum(values) / max(plan.tokens, 1)
            out[plan.task["name"]] = dict(loss=loss, ppl=math.exp(min(loss, 700.0)))
            continue
        acc = acc_norm = chance = 0.0
        at = 0
        for count, lengths, gold in plan.items:
            ll = [-v for v in values[at : at + count]]
            at += count
            acc += float(max(range(count), key=lambda i: (ll[i], -i)) == gold)
            acc_norm += float(max(range(count), key=lambda i: (ll[i] / lengths[i], -i)) == gold)
            chance += 1.0 / count
        n = len(plan.items)
        out[plan.task["name"]] = dict(acc=acc / n, acc_norm=acc_norm / n, chance=chance / n, items=float(n))
    return out


def metrics_record(step: int, scores: Dict[str, Dict[str, float]]) -> Dict[str, Any]:
    """The metrics.jsonl line of an evaluation: ``eval/<task>/<metric>`` keys."""
    record: Dict[str, Any] = dict(step=step)
    for name, values in scores.items():
        for metric, value in values.items():
            if metric != "items":
                record[f"eval/{name}/{metric}"] = value
    return record


def console_line(step: int, scores: Dict[str, Dict[str, float]], seconds: float) -> str:
    """``step 50: eval next_line acc 0.412 acc_norm 0.398 (chance 0.250, 200 items) | heldout ppl 35.20 (2.1 s)``."""
    parts = []
    for name, v in scores.items():
        if "ppl" in v:
            parts.append(f"{name} ppl {v['ppl']:.2f} (loss {v['loss']:.4f})")
        else:
            parts.append(
                f"{name} acc {v['acc']:.3f} acc_norm {v['acc_norm']:.3f} (chance {v['chance']:.3f}, "
                f"{int(v['items'])} items)"
            )
    return f"step {step}: eval " + " | ".join(parts) + f" ({seconds:.1f} s)"


class Evaluator:
    """Runs the tasks of the run's ``evaluation`` section; ``log`` writes a metrics record, ``message`` a console
    line (rank 0's `MetricsLogger`); ``load_tokenizer(path)`` loads the data section's tokenizer."""

    def __init__(
        self,
        section: Any,
        log: Callable[[Dict[str, Any]], None],
        message: Callable[[str], None],
        load_tokenizer: Callable[[str], Any],
    ) -> None:
        self.section = section
        self.log = log
        self.message = message
        self.load_tokenizer = load_tokenizer
        self._plans: Dict[Tuple[str, int], List[TaskPlan]] = {}
        self.last_scores: Optional[Dict[str, Dict[str, float]]] = None

    @property
    def enabled(self) -> bool:
        return bool(self.section.tasks)

    def due(self, step: int, phase_end: bool) -> bool:
        """Whether global step ``step`` (0: before the first step of a fresh run) is evaluated."""
        if not self.enabled:
            return False
        if step == 0:
            return self.section.at_start
        return (phase_end and self.section.at_phase_end) or bool(self.section.every) and step % self.section.every == 0

    def plans(self, data: Any) -> List[TaskPlan]:
        """The tasks tokenized for ``data``'s tokenizer and seq_len (cached)."""
        cache_key = (data.tokenizer_path, data.seq_len)
        if cache_key not in self._plans:
            if not data.tokenizer_path:
                raise ValueError("evaluation.tasks needs data.tokenizer_path (the tokenizer of the task texts)")
            if self.section.prepare_demo_tasks and not self._plans:  # the same files for every phase of the demo
                build_demo_tasks(self.section.prepare_demo_tasks, data)
            self._plans[cache_key] = plan_tasks(
                self.section.tasks, self.load_tokenizer(data.tokenizer_path), data.seq_len
            )
        return self._plans[cache_key]

    @torch.no_grad()
    def run(self, model: Any, runner: Any, schedule: Any, data: Any, step: int) -> Dict[str, Dict[str, float]]:
        """Score every task with ``model`` (a `ModelState`) through ``schedule``; log and return the scores."""
        started = time.perf_counter()
        pc, chunks = model.pc, model.chunks
        plans = self.plans(data)
        spans = [span for plan in plans for span in plan.spans]
        packed = pack_spans(spans, data.seq_len, data.micro_bsz, pc.dp_rank, pc.dp_size)
        batches = []
        for mb in packed.batches:
            # span_ids go to the device first: a context rank keeps its tokens' span ids (`split_for_context`)
            batches.append(runner.to_device(dict(mb, span_ids=mb["span_ids"].to(runner.device)), pc))
        if len(chunks) > 1 and batches and len(batches) % pc.pp_size:
            batches += [padding_batch(batches[-1], packed.num_spans)] * (pc.pp_size - len(batches) % pc.pp_size)
        loss = SpanLoss(batches, packed.num_spans, runner.device, pc.tp_group if pc.tp_size > 1 else None)
        modes = [chunk.training for chunk in chunks]
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if runner.device.type == "cuda" else None
        model.optimizer.sync_params()
        try:
            for chunk in chunks:
                chunk.eval()
            if batches:
                schedule.forward_backward(chunks, batches, loss, 1.0, forward_only=True)
        finally:
            for chunk, mode in zip(chunks, modes):
                chunk.train(mode)
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
        values = loss.values[: packed.num_spans]
        # the last stage holds the values; data ranks hold disjoint spans, context ranks disjoint tokens of them
        for group in (pc.pp_group, pc.dp_group, getattr(pc, "cp_group", None)):
            all_reduce_(values, group)
        scores = score_tasks(plans, values.tolist())
        self.last_scores = scores
        self.log(metrics_record(step, scores))
        self.message(console_line(step, scores, time.perf_counter() - started))
        return scores


__all__ = ["Evaluator", "TaskPlan", "console_line", "metrics_record", "plan_tasks", "score_tasks"]
