"""Shared pieces of the benchmarks: packed micro-batches, our trainer's step, transformers' Llama step, timing.

* `packed_batch`: micro-batches as `internlm.data` yields them (documents packed end to end, positions restarting
  per document, ``-100`` after the last token of every document), from a fixed seed.
* `TrainerStep`: what `internlm.train.trainer.Trainer` runs per step, built by `internlm.train.build` from a
  `RunConfig` (model chunks with ``model.compile`` / ``model.fused_loss`` / ``model.checkpoint``, the hybrid ZeRO
  optimizer, the loss, the schedule): ``begin_step``, ``schedule.forward_backward``, ``optimizer.step()``.
* `HFStep`: transformers' ``LlamaForCausalLM`` of the same shape (InternLM is LLaMA with q/k/v/o biases) and
  ``torch.optim.AdamW``, on the same batch: one (micro_bsz, seq_len) row per packed sequence with the equivalent
  4D per-document causal mask and per-document positions; loss ``F.cross_entropy`` (fp32 logits, sum) / tokens.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F

from internlm.config import RunConfig, load_run_config
from internlm.kernels import kernel_backend
from internlm.labels import IGNORE_INDEX
from internlm.model import PackedDocs
from internlm.parallel import ParallelContext
from internlm.train.activation_checkpoint import compile_layers
from internlm.train.build import build_loss_fn, build_model_chunks, build_optimizer, build_step_schedule

CONFIG = """
JOB_NAME = "benchmark"
work_dir = {work_dir!r}
seed = 11
model = {model!r}
parallel = dict(tensor=1, pipeline=dict(size=1), zero1=-1, sequence_parallel=False)
data = dict(seq_len={seq_len}, micro_bsz={micro_bsz}, micro_num={micro_num}, total_steps=10)
adam = dict(lr=1e-4, weight_decay=0.01)
"""


def run_config(model: Dict[str, Any], seq_len: int, micro_bsz: int, micro_num: int, sets: Sequence[str] = ()):
    """A `RunConfig` of one process for ``model`` (a model section dict) and the batch shape; ``sets`` are
    ``key=value`` overrides (``model.compile=True``)."""
    folder = tempfile.mkdtemp(prefix="internlm_bench_")
    path = os.path.join(folder, "config.py")
    with open(path, "w") as f:
        f.write(
            CONFIG.format(
                work_dir=os.path.join(folder, "work"),
                model=model,
                seq_len=seq_len,
                micro_bsz=micro_bsz,
                micro_num=micro_num,
            )
        )
    return load_run_config(path, list(sets))


def document_lengths(total: int, mean: int, rng: random.Random) -> List[int]:
    """Document lengths filling ``total`` tokens: exponential around ``mean`` (at least 8), the last one cut."""
    lengths: List[int] = []
    while sum(lengths) < total:
        lengths.append(min(max(8, int(rng.expovariate(1.0 / mean))), total - sum(lengths)))
    return lengths


def packed_batch(
    vocab: int, seq_len: int, micro_bsz: int, micro_num: int, mean_doc: int, seed: int, device: torch.device
) -> List[Dict[str, Any]]:
    """``micro_num`` micro-batches of ``micro_bsz`` packed sequences of ``seq_len`` tokens (the loader's format,
    plus ``docs``: the `PackedDocs` the trainer adds)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(micro_num):
        bounds, positions = [0], []
        for _ in range(micro_bsz):
            for n in document_lengths(seq_len, mean_doc, rng):
                bounds.append(bounds[-1] + n)
                positions.append(torch.arange(n))
        n_tokens = micro_bsz * seq_len
        ids = torch.randint(0, vocab, (1, n_tokens), generator=gen)
        labels = torch.roll(ids, -1, dims=1)
        labels[0, torch.tensor(bounds[1:]) - 1] = IGNORE_INDEX  # no label after a document's last token
        cu = torch.tensor(bounds, dtype=torch.int32)
        mb = dict(
            input_ids=ids.to(device),
            labels=labels.to(device),
            cu_seqlens=cu.to(device),
            cu_seqlens_list=bounds,
            position_ids=torch.cat(positions)[None].to(device),
            max_seqlen=max(b - a for a, b in zip(bounds[:-1], bounds[1:])),
            label_tokens=int((labels != IGNORE_INDEX).sum()),
        )
        mb["docs"] = PackedDocs(mb["cu_seqlens"], bounds, mb["max_seqlen"])
        out.append(mb)
    return out


def label_tokens(batch: List[Dict[str, Any]]) -> int:
    return sum(mb["label_tokens"] for mb in batch)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainerStep:
    """Our trainer's step on one process (see the module docstring). ``kernels``: the `internlm.kernels` policy
    while it runs ("eager": the pure torch references everywhere, "auto": Triton on GPUs)."""

    def __init__(
        self,
        run: RunConfig,
        device: torch.device,
        kernels: str = "auto",
        initial_state: Optional[Dict[str, torch.Tensor]] = None,
        compile_options: Optional[Dict[str, Any]] = None,
    ) -> None:
        """``initial_state``: weights to start from instead of the random initialisation (loaded before the
        optimizer takes its fp32 master copy, as a resume does). ``compile_options``: compile the layers with
        these `torch.compile` options instead of ``model.compile``'s defaults (e.g. ``backend="eager"``)."""
        self.run, self.device, self.kernels = run, device, kernels
        pc = ParallelContext()
        self.chunks = build_model_chunks(run, pc, device, init=initial_state is None)
        if initial_state is not None:
            self.chunks[0].load_state_dict(initial_state, strict=True)
        if compile_options is not None:
            for chunk in self.chunks:
                compile_layers(chunk, **compile_options)
        self.optimizer = build_optimizer(self.chunks, run, pc)
        self.loss_fn = build_loss_fn(run, pc)
        self.schedule = build_step_schedule(run, pc)
        self.optimizer.set_lr(run.adam.lr)

    def num_params(self) -> int:
        return sum(p.numel() for chunk in self.chunks for p in chunk.parameters())

    def __call__(self, batch: List[Dict[str, Any]]) -> torch.Tensor:
        scale = 1.0 / max(label_tokens(batch), 1)
        with kernel_backend(self.kernels):
            self.optimizer.begin_step(len(batch))
            loss_sum = self.schedule.forward_backward(self.chunks, batch, self.loss_fn, scale)
            self.optimizer.step()
        return loss_sum.detach() * scale

    def close(self) -> None:
        self.optimizer.close()


def hf_llama(model_config: Any, device: torch.device, attn_implementation: str = "sdpa"):
    """transformers' LlamaForCausalLM of ``model_config``'s shape and dtype (needs ``pip install transformers``)."""
    import transformers

    hf_cfg = transformers.LlamaConfig(
        **{**model_config.to_hf(), "use_cache": False}, attn_implementation=attn_implementation
    )
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hf_cfg).to(model_config.dtype)
    return model


class HFStep:
    """transformers' Llama + torch AdamW on the same batch (see the module docstring)."""

    def __init__(self, model_config: Any, device: torch.device, lr: float = 1e-4, compile: bool = False) -> None:
        self.device = device
        self.model = hf_llama(model_config, device)
        self.model.train()
        if compile:
            self.model.compile()
        cuda = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=lr, weight_decay=0.01, foreach=not cuda, fused=cuda
        )
        self._masks: Dict[int, Dict[str, torch.Tensor]] = {}

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def _inputs(self, mb: Dict[str, Any], seq_len: int) -> Dict[str, torch.Tensor]:
        key = id(mb)
        if key not in self._masks:
            rows = mb["input_ids"].shape[1] // seq_len
            bounds = mb["cu_seqlens_list"]
            doc = torch.zeros(mb["input_ids"].shape[1], dtype=torch.long)
            for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
                doc[a:b] = i
            doc = doc.view(rows, seq_len).to(self.device)
            causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=self.device).tril()
            mask = (doc[:, :, None] == doc[:, None, :]) & causal  # (rows, S, S): same document, causal
            self._masks[key] = dict(
                input_ids=mb["input_ids"].view(rows, seq_len),
                position_ids=mb["position_ids"].view(rows, seq_len),
                attention_mask=mask[:, None],
                labels=mb["labels"].view(rows, seq_len),
            )
        return self._masks[key]

    def __call__(self, batch: List[Dict[str, Any]], seq_len: int) -> torch.Tensor:
        scale = 1.0 / max(label_tokens(batch), 1)
        total = torch.zeros((), device=self.device)
        for mb in batch:
            inputs = self._inputs(mb, seq_len)
            logits = self.model(
                input_ids=inputs["input_ids"],
                position_ids=inputs["position_ids"],
                attention_mask=inputs["attention_mask"],
            ).logits
            loss = F.cross_entropy(
                logits.float().flatten(0, 1), inputs["labels"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            (loss * scale).backward()
            total += loss.detach()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total * scale

    def close(self) -> None:
        pass


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call, synchronised on CUDA."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


@contextlib.contextmanager
def fresh_memory(device: torch.device) -> Iterator[None]:
    """Free what earlier variants left, reset the peak counter (CUDA)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    yield
    gc.collect()


def peak_memory_gib(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def machine_load() -> str:
    """The 1-minute load average against the cores this process may use (busy machines time slower)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return "unknown"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"load average {load:.2f} on {cores} cores, torch threads {torch.get_num_threads()}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, columns padded."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in lines)
