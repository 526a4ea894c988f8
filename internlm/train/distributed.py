"""Process start-up: torchrun's environment -> torch.distributed, device selection."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout


@dataclass
class Launch:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def world_size_from_env() -> int:
    """The world size torchrun announces (1 for a plain `python train.py`)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def timeout_of(minutes: float) -> timedelta:
    """The process-group timeout of ``parallel.timeout_minutes``."""
    return timedelta(minutes=float(minutes))


def restart_count() -> int:
    """Which attempt of a torchrun agent this process belongs to: ``$TORCHELASTIC_RESTART_COUNT`` (0 on the first
    attempt and outside torchrun; ``--max-restarts N`` allows attempts 0..N)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def _attempt_store(timeout: timedelta) -> Any:
    """The env:// rendezvous store, its keys prefixed by the restart attempt (``internlm/attempt<N>/``).

    Why: torchrun's agent hosts one TCPStore for the whole job and keeps it across restarts, and torch names the
    default group and every ``new_group`` the same way on every attempt, so without a prefix a restarted worker
    reads the dead attempt's keys: gloo connects to the old workers' addresses (``connectFullMesh failed ...
    Connection refused``) or waits for keys that are already counted (a hang until the timeout)."""
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    store.set_timeout(timeout)
    return dist.PrefixStore(f"internlm/attempt{restart_count()}", store)


def init_distributed(timeout: Optional[timedelta] = None) -> Launch:
    """Initialise torch.distributed under torchrun: NCCL on GPUs, gloo on CPU. One process: nothing to do.

    ``timeout`` (``parallel.timeout_minutes``, see `timeout_of`) bounds every collective of the default group;
    None keeps torch's default. The rendezvous store is scoped to the torchrun attempt (`_attempt_store`), so a
    group restarted by ``torchrun --max-restarts`` meets afresh."""
    world_size = world_size_from_env()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        timeout = timeout if timeout is not None else default_pg_timeout  # gloo's default (30 minutes)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            store=_attempt_store(timeout),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
        )
    return Launch(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


_PEER_LOST = ("Connection reset by peer", "Connection closed by peer")  # gloo's words for a peer that went away


def peer_failure(exc: BaseException, rank: int) -> Optional[str]:
    """One line for a collective that failed because another rank died or stopped answering (torch's DistError,
    or gloo's lost connection), None for any other exception (a bug keeps its traceback)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    lost = isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and any(p in text for p in _PEER_LOST))
    if not lost:
        return None
    return (
        f"rank {rank}: a collective failed because another rank died or stopped answering ({text[:200]}); the rank "
        f"that failed first is named in torchrun's summary; under torchrun --max-restarts the group restarts and "
        f"resumes from the last complete checkpoint, otherwise rerun the command"
    )


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
