"""What a parallel layout holds: the parallel context, this rank's model chunks, the loss function and the
optimizer; rebuilt when a phase runs under another layout."""

from __future__ import annotations

from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist

from internlm.parallel import ParallelContext, describe_groups, init_parallel_context

from .build import build_loss_fn, build_model_chunks, build_optimizer
from .distributed import timeout_of
from .metrics import MetricsLogger
from .phases import Phase


def _release_groups(pc: ParallelContext) -> None:
    """Destroy the process groups of a parallel context that is being replaced (after a world barrier, so no
    rank still has work queued on them)."""
    kinds = (pc.tp_group, pc.pp_group, pc.dp_group, pc.zero1_group, pc.zero1_replica_group, pc.cp_group)
    groups = {id(g): g for g in kinds if g is not None}
    if not groups:
        return
    dist.barrier()
    for group in groups.values():
        dist.destroy_process_group(group)


class ModelState:
    """The current layout's ``pc``, ``chunks``, ``loss_fn`` and ``optimizer``. ``pc`` starts as the context of
    the first phase's layout; the chunks are built by the first `enter` (before it they are None)."""

    def __init__(self, pc: ParallelContext, device: torch.device, logger: MetricsLogger) -> None:
        self.pc = pc
        self.device = device
        self.logger = logger
        self.chunks: Optional[List[torch.nn.Module]] = None
        self.loss_fn: Optional[Callable[..., torch.Tensor]] = None
        self.optimizer: Optional[Any] = None  # a HybridZeroOptimizer over ``chunks``

    def enter(self, phase: Phase, init: bool = True) -> bool:
        """Make the parallel context, model chunks and loss those of ``phase.layout``.

        Returns True when the chunks were (re)built: they then hold fresh initial weights, and any optimizer
        of an earlier layout has been closed (``optimizer`` is None). Every rank calls this at the same point: a
        new context creates its process groups collectively, in the same order everywhere.
        ``init=False``: a checkpoint is about to overwrite the weights, so new chunks skip the random init.
        """
        wanted = phase.layout
        if self.chunks is not None and wanted == self.pc.layout:
            return False
        self.close_optimizer()
        if self.chunks is not None:
            self.logger.message(f"parallel layout changes from {self.pc.layout.describe()} to {wanted.describe()}")
        if wanted != self.pc.layout:
            _release_groups(self.pc)
            timeout = timeout_of(phase.config.parallel.timeout_minutes)
            self.pc = init_parallel_context(wanted, self.pc.rank, timeout=timeout)
            if self.pc.world_size > 1:
                self.logger.message(describe_groups(self.pc))
        self.chunks = None  # free the old chunks (and the closed optimizer's buffers they view) first
        self.chunks = build_model_chunks(phase.config, self.pc, self.device, init=init)
        self.loss_fn = build_loss_fn(phase.config, self.pc)
        return True

    def new_optimizer(self, phase: Phase) -> None:
        """A fresh optimizer over the chunks, with ``phase``'s settings (an existing one is closed first)."""
        self.close_optimizer()
        self.optimizer = build_optimizer(self.chunks, phase.config, self.pc)

    def close_optimizer(self) -> None:
        """Close the optimizer (its buffers and hooks), if there is one."""
        if self.optimizer is not None:
            self.optimizer.close()
            self.optimizer = None
