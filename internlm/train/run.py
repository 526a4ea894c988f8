"""Run the phases of a training job on this process (one of `WORLD_SIZE` under torchrun)."""

from __future__ import annotations

import os
import sys
from typing import List

import torch
import torch.distributed as dist

from internlm.config import ConfigError
from internlm.data.errors import DataError
from internlm.errors import BadInputError, CheckpointSaveError

from .distributed import init_distributed, peer_failure, shutdown_distributed, timeout_of
from .health import UnhealthyStop
from .phases import Phase
from .startup_checks import start_up
from .stop import Aborted, StopRequested
from .trainer import Trainer

# exit statuses (README.md, docs/troubleshooting.md): 0 the run finished; 2 a bad input (config, data, checkpoint,
# work_dir), nothing trained; EXIT_UNHEALTHY: stopped on health.max_skipped_steps non-finite steps in a row (or no
# healthy checkpoint to resume from), no checkpoint saved while unhealthy; EXIT_STOPPED: stopped on SIGTERM or
# ckpt.stop_file_path after saving a checkpoint, resumable by rerunning the command (EX_TEMPFAIL of sysexits.h, so a
# requeue wrapper can tell it from a finished run); EXIT_ABORTED: a second Ctrl-C, nothing saved (128 + SIGINT,
# what a shell reports for a process killed by Ctrl-C); EXIT_SAVE_FAILED: a checkpoint could not be written (EX_IOERR:
# a full disk, an I/O error), its partial folder removed, not requeued as 75 is (a rerun would fail the same way)
EXIT_BAD_INPUT = 2
EXIT_UNHEALTHY = 3
EXIT_STOPPED = 75
EXIT_ABORTED = 130
EXIT_SAVE_FAILED = 74  # a checkpoint could not be written (full disk, I/O error): EX_IOERR; earlier ones intact


def cpu_threads(local_processes: int) -> int:
    """Intra-op threads of each of ``local_processes`` CPU training processes on this node: the cores this
    process may run on, shared out (at least one each)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(local_processes, 1))


def _set_cpu_threads() -> None:
    """Several CPU processes on one node: torchrun sets OMP_NUM_THREADS=1 for each, which leaves cores idle; share
    the cores out instead (an OMP_NUM_THREADS other than 1 is the user's and is kept)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local > 1 and os.environ.get("OMP_NUM_THREADS", "1") == "1":
        torch.set_num_threads(cpu_threads(local))


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
    if trainer.model.pc.world_size > 1 or not path or not os.path.isfile(path):
        return
    tokenizer = Tokenizer(path)
    prompt = "The "
    ids = generate(
        trainer.model.chunks[0],
        tokenizer.encode(prompt),
        max_new_tokens=48,
        temperature=0.7,
        top_k=20,
        eos_id=tokenizer.eos_id,
        seed=phases[-1].config.seed,
    )
    print("\nsample from the trained model:\n" + tokenizer.decode(ids).strip() + "\n", flush=True)


def _bad_input(exc: Exception, rank: int) -> int:
    """`EXIT_BAD_INPUT` for a bad input: one line, printed once (rank 0, or the one rank that found it). A data
    error after start-up (the start-up checks read every shard's meta) may be this rank's alone: it prints it."""
    if rank == 0 or getattr(exc, "local", isinstance(exc, DataError)):
        print(f"error: {exc}", file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT


def _train(trainer: Trainer, rank: int) -> int:
    """Run the trainer; its exit status (0: finished), also sent as the ``stop`` alert with the reason."""
    status, reason = 1, "failed"
    try:
        trainer.run()
        status, reason = 0, "finished"
    except StopRequested as exc:
        status, reason = EXIT_STOPPED, str(exc)
    except UnhealthyStop as exc:  # the reason is in train.log and on the console (rank 0)
        status, reason = EXIT_UNHEALTHY, str(exc)
    except Aborted as exc:
        status, reason = EXIT_ABORTED, str(exc)
    except CheckpointSaveError as exc:  # one line (rank 0); the partial save is removed
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        status, reason = EXIT_SAVE_FAILED, str(exc)
    except (ConfigError, BadInputError, DataError) as exc:  # found once checkpoints are read (phases reordered)
        status, reason = _bad_input(exc, rank), str(exc)
    except BaseException as exc:
        reason = f"{type(exc).__name__}: {exc}"
        lost = peer_failure(exc, rank)
        if lost is None:
            raise
        print(f"error: {lost}", file=sys.stderr, flush=True)  # one line, not the collective's traceback
        reason = lost
    finally:
        trainer.watch.finished(status, reason)
    return status


def run_training(phases: List[Phase]) -> int:
    timeout = timeout_of(phases[0].config.parallel.timeout_minutes)
    launch = init_distributed(timeout)
    from internlm.parallel import init_parallel_context

    if launch.device.type == "cpu":
        _set_cpu_threads()
    lock = None
    try:
        pc = init_parallel_context(phases[0].layout, launch.rank, timeout=timeout)
        _prepare_demo_data(phases, launch.rank)
        try:
            lock = start_up(phases, launch.rank)  # the work_dir lock (rank 0) and the start-up checks
        except BadInputError as exc:
            return _bad_input(exc, launch.rank)
        trainer = Trainer.build(phases, launch, pc)  # rank 0 prints the banner, steps, the stop reason, the final line
        trainer.watch.started(phases[0].config.work_dir)  # a start (or restart) alert
        status = _train(trainer, launch.rank)
        if status:
            return status
        if launch.rank == 0:
            try:
                _print_sample(trainer, phases)
            except Exception as exc:  # the run is finished and saved: a sample that fails must not fail it
                print(f"warning: no sample printed ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)
    finally:
        if lock is not None:
            lock.release()
        shutdown_distributed()
    return 0
