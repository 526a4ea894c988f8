"""Run the phases of a training job on this process (one of `WORLD_SIZE` under torchrun)."""

from __future__ import annotations

import os
import sys
from typing import List

import torch.distributed as dist

from internlm.config import ConfigError

from .distributed import init_distributed, shutdown_distributed
from .phases import Phase
from .trainer import StopRequested, Trainer


def _prepare_demo_data(phases: List[Phase], rank: int) -> None:
    """The demo's corpus and tokenizer are built on first use by rank 0 and cached."""
    demo = [p.config for p in phases if p.config.data.prepare_demo_data]
    if not demo:
        return
    if rank == 0:
        from internlm.data import prepare_demo_data

        prepare_demo_data(demo[0].data.demo_cache_dir, vocab_size=demo[0].model_config.vocab_size)
    if dist.is_initialized():
        dist.barrier()


def _print_sample(trainer: Trainer, phases: List[Phase]) -> None:
    """Show what the model learned: a short sample (single-device models only)."""
    from internlm.data import Tokenizer
    from internlm.model import generate

    path = phases[-1].config.data.tokenizer_path
    if trainer.pc.world_size > 1 or not path or not os.path.isfile(path):
        return
    tokenizer = Tokenizer(path)
    prompt = "The "
    ids = generate(
        trainer.chunks[0],
        tokenizer.encode(prompt),
        max_new_tokens=48,
        temperature=0.7,
        top_k=20,
        eos_id=tokenizer.eos_id,
        seed=phases[-1].config.seed,
    )
    print("\nsample from the trained model:\n" + tokenizer.decode(ids).strip() + "\n", flush=True)


def run_training(phases: List[Phase]) -> int:
    launch = init_distributed()
    from internlm.parallel import describe_groups, init_parallel_context

    try:
        pc = init_parallel_context(phases[0].layout, launch.rank)
        if launch.rank == 0:
            print(describe_groups(pc), flush=True)
        _prepare_demo_data(phases, launch.rank)
        trainer = Trainer(phases, launch, pc)
        try:
            summary = trainer.run()
        except StopRequested as stop:
            if launch.rank == 0:
                print(str(stop), flush=True)
            return 0
        except ConfigError as exc:  # found only once checkpoints are read (e.g. phases reordered)
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if launch.rank == 0:
            losses = "" if summary["loss"] is None else f", last loss {summary['loss']:.4f}"
            if summary["val_loss"] is not None:
                losses += f", last validation loss {summary['val_loss']:.4f}"
            print(f"done: step {summary['step']}, tokens {summary['tokens']:,}{losses}", flush=True)
            _print_sample(trainer, phases)
    finally:
        shutdown_distributed()
    return 0
