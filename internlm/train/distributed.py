"""Process start-up: torchrun's environment -> torch.distributed, device selection."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist


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


def init_distributed(timeout: Optional[timedelta] = None) -> Launch:
    """Initialise torch.distributed under torchrun: NCCL on GPUs, gloo on CPU. One process: nothing to do.

    ``timeout`` (``parallel.timeout_minutes``, see `timeout_of`) bounds every collective of the default group;
    None keeps torch's default."""
    world_size = world_size_from_env()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        options = {} if timeout is None else {"timeout": timeout}
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **options)
    return Launch(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
