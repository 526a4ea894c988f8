"""InternLM's hybrid ZeRO stage 1: fp32 master weights and AdamW moments sharded over the zero1 group.

Per step, on every rank (see docs/zero.md for the volumes)::

    begin_step(n) -> n x backward        gradients accumulate in fp32 buffers; ready buckets all-reduce (SUM,
                                         data-parallel group) while backward continues
    step()                               wait for buckets; sum partial-gradient slices over the tensor group;
                                         global grad norm (one scalar all-reduce per zero1/tp/pp group);
                                         skip on inf/nan, else clip + AdamW on this rank's fp32 slice;
                                         copy the slice into the model dtype; all-gather slices over zero1
    next forward                         a forward pre-hook of each chunk waits for that chunk's gather

``zero1_size`` may be smaller than ``dp_size`` (hybrid): data-parallel ranks form ``dp_size / zero1_size``
consecutive blocks, each block shards the optimizer state once, and blocks hold identical replicas.

Each parameter's tensor-parallel placement is its `TPShard` (`internlm.parallel.param_shards`): duplicates
are counted once in the grad norm, partial gradients are summed over the tensor group, and the checkpoint
formats record the shard. Checkpoint helpers (`shard_state.py`, `full_state.py`) work on values; this class
turns its AdamW state into `StateValues` and installs the ones a load returns.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch
from torch import nn

from internlm.parallel.comm import group_size
from internlm.parallel.tp_shard import TPShard, param_shards

from .collectives import all_gather_shards
from .flat_buffer import BufferKey, FlatBuffer
from .full_state import cut_full_state
from .grad_norm import global_grad_norm
from .grad_sync import GradReducer
from .shard_state import StateValues, read_shard_state, shard_state


class HybridZeroOptimizer:
    """AdamW over flat sharded fp32 master weights, with bucketed overlapped gradient reduction.

    ``pc`` is any object with ``dp_size, dp_rank, dp_group, zero1_size, zero1_rank, zero1_group, tp_size,
    tp_rank, tp_group, pp_size, pp_group`` (groups are ``None`` for size 1). Weight decay applies to
    parameters with two or more dimensions (matrices, embeddings), not to norm weights or biases.
    """

    def __init__(
        self,
        model_chunks: Sequence[nn.Module],
        pc: Any,
        lr: float,
        betas: Tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        clip_grad_norm: float = 1.0,
        reduce_bucket_size: int = 512 * 1024**2,
        overlap_sync_grad: bool = True,
        overlap_sync_param: bool = True,
    ) -> None:
        _check_context(pc)
        self.pc = pc
        self.model_chunks = list(model_chunks)
        self.clip_grad_norm = clip_grad_norm
        self.overlap_sync_param = overlap_sync_param
        self.skipped_steps = 0
        self.num_updates = 0  # AdamW steps applied (skipped steps excluded)

        self.buffers = _build_buffers(self.model_chunks, pc.zero1_size, pc.zero1_rank)
        self.grad_reducer = GradReducer(self.buffers, pc.dp_group, pc.tp_group, reduce_bucket_size, overlap_sync_grad)
        # fp32 master copy of the owned slice; its .grad is a view of the owned slice of the fp32 grad buffer
        self.masters: List[torch.Tensor] = []
        for buffer in self.buffers:
            master = buffer.param_shard().detach().to(torch.float32, copy=True)
            master.grad = buffer.grad_shard()
            self.masters.append(master)
        groups = [
            {"params": [master], "weight_decay": weight_decay if buffer.key.decay else 0.0}
            for buffer, master in zip(self.buffers, self.masters)
        ]
        impl = {"fused": True} if self.masters[0].device.type == "cuda" else {"foreach": True}
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **impl)

        self._gathers: Dict[int, List[Any]] = defaultdict(list)  # chunk index -> in-flight param gathers
        self._pre_hooks = [
            chunk.register_forward_pre_hook(self._make_wait_hook(i)) for i, chunk in enumerate(self.model_chunks)
        ]

    # ------------------------------------------------------------------ step protocol
    def begin_step(self, num_micro_batches: int) -> None:
        """Arm the gradient hooks: each parameter's gradient is final after ``num_micro_batches`` backward passes."""
        self.grad_reducer.begin_step(num_micro_batches)

    def step(self) -> Tuple[float, bool]:
        """Reduce, clip and apply this step's gradients; returns ``(grad_norm, skipped)``.

        The norm is taken before clipping. A non-finite norm skips the update on every rank (the norm is the
        same everywhere), drops the gradients and increments ``skipped_steps``.
        """
        self.grad_reducer.finish()
        norm = global_grad_norm(self.buffers, self.pc.zero1_group, self.pc.tp_group, self.pc.pp_group, self.pc.tp_rank)
        norm_value = float(norm)
        if not math.isfinite(norm_value):
            self.skipped_steps += 1
            self.grad_reducer.zero()
            return norm_value, True
        if self.clip_grad_norm is not None and self.clip_grad_norm > 0:
            # as torch.nn.utils.clip_grad_norm_: coefficient min(1, max_norm / (norm + 1e-6)), in fp32
            coef = (self.clip_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            for master in self.masters:
                master.grad.mul_(coef)
        self.optimizer.step()
        self.num_updates += 1
        self._publish_params(async_op=self.overlap_sync_param)
        self.grad_reducer.zero()
        return norm_value, False

    def zero_grad(self) -> None:
        """Drop accumulated gradients (also disarms the step's hooks)."""
        self.grad_reducer.zero()

    # ------------------------------------------------------------------ parameter all-gather
    @torch.no_grad()
    def _publish_params(self, async_op: bool) -> None:
        """Copy each fp32 master slice into the model dtype and all-gather the slices over the zero1 group."""
        self.sync_params()  # a gather still in flight (no forward since the last step) reads the slice we overwrite
        for buffer, master in zip(self.buffers, self.masters):
            buffer.param_shard().copy_(master)
            work = all_gather_shards(buffer.params, self.pc.zero1_group, async_op=async_op)
            if work is not None:
                self._gathers[buffer.key.chunk].append(work)

    def _wait_chunk(self, chunk: int) -> None:
        for work in self._gathers.pop(chunk, []):
            work.wait()

    def _make_wait_hook(self, chunk: int):
        def hook(module: nn.Module, args: Any) -> None:
            self._wait_chunk(chunk)

        return hook

    @property
    def param_sync_pending(self) -> bool:
        """True while a parameter all-gather launched by ``step()`` has not been waited for."""
        return any(self._gathers.values())

    def sync_params(self) -> None:
        """Wait until every model parameter holds the gathered values of the last step (before save or eval)."""
        for chunk in list(self._gathers):
            self._wait_chunk(chunk)

    def close(self) -> None:
        """Detach from the model: finish in-flight collectives, remove gradient and forward hooks.

        The parameters keep their current values (still views of this optimizer's buffer until a new
        optimizer flattens them again), so a fresh optimizer can be built on the same chunks.
        """
        self.sync_params()
        self.grad_reducer.zero()
        self.grad_reducer.remove_hooks()
        for handle in self._pre_hooks:
            handle.remove()
        self._pre_hooks = []

    # ------------------------------------------------------------------ hyper-parameters
    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        """The AdamW groups (one per flat buffer); ``param_groups[0]["lr"]`` is the current learning rate."""
        return self.optimizer.param_groups

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def set_beta2(self, beta2: float) -> None:
        for group in self.optimizer.param_groups:
            group["betas"] = (group["betas"][0], beta2)

    # ------------------------------------------------------------------ state
    def optim_state_bytes(self) -> int:
        """Bytes of fp32 state this rank holds in training: master slice (4) + exp_avg (4) + exp_avg_sq (4) per
        owned element, i.e. about ``12 * num_params / zero1_size`` plus padding."""
        return sum(12 * master.numel() for master in self.masters)

    def state_dict(self) -> Dict[str, Any]:
        """This rank's shard (master weights, AdamW moments, counters) with its layout metadata."""
        return shard_state(self._ranks(), self.buffers, self._state_values())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a shard saved under the same layout; raises ValueError naming any layout difference
        (another layout goes through ``load_full_state``).

        Collective over the zero1 group: the restored master slices are gathered into the model parameters.
        """
        self.sync_params()
        self._install_state(read_shard_state(state, self._ranks(), self.buffers))
        self._publish_params(async_op=False)

    def load_full_state(self, full: Mapping[str, Any]) -> None:
        """Restore from a layout-independent full state (``internlm.train.reshard.merge_optimizer_checkpoint``):
        for every buffer, the owned slice of each parameter's full fp32 master, ``exp_avg`` and ``exp_avg_sq``
        after cutting the parameter's own tensor shard (`TPShard.slice`); then the counters, lr and betas.

        Any saved layout works (see ``full_state.py`` for the index arithmetic). Collective over the zero1
        group: the restored master slices are gathered into the model parameters.
        """
        self.sync_params()
        self._install_state(cut_full_state(full, self.buffers))
        self._publish_params(async_op=False)

    def _ranks(self) -> Dict[str, int]:
        """The group sizes and ranks a shard records."""
        pc = self.pc
        return dict(
            zero1_size=pc.zero1_size,
            zero1_rank=pc.zero1_rank,
            dp_size=pc.dp_size,
            dp_rank=pc.dp_rank,
            tp_size=pc.tp_size,
            tp_rank=pc.tp_rank,
            pp_size=pc.pp_size,
        )

    def _state_values(self) -> StateValues:
        """The current state (masters and moments are the live tensors, not copies)."""
        states = [self.optimizer.state.get(master, {}) for master in self.masters]
        updated = all("exp_avg" in state for state in states)
        group = self.optimizer.param_groups[0]
        return StateValues(
            masters=list(self.masters),
            moments=[(state["exp_avg"], state["exp_avg_sq"]) for state in states] if updated else None,
            num_updates=self.num_updates,
            skipped_steps=self.skipped_steps,
            lr=group["lr"],
            betas=tuple(group["betas"]),
        )

    @torch.no_grad()
    def _install_state(self, values: StateValues) -> None:
        """Copy ``values`` in: the master slices, AdamW's moments (none: no update yet, no state) with step count
        ``num_updates``, the counters, lr and betas. Each param group keeps its own weight decay (it follows the
        buffer kind, not the saved state)."""
        for master, saved in zip(self.masters, values.masters):
            master.copy_(saved)
        torch_state: Dict[str, Any] = {"state": {}, "param_groups": []}
        for index, (master, group) in enumerate(zip(self.masters, self.optimizer.param_groups)):
            if values.moments is not None:
                exp_avg, exp_avg_sq = values.moments[index]
                torch_state["state"][index] = {
                    "step": torch.tensor(float(values.num_updates), dtype=torch.float32),
                    "exp_avg": exp_avg.to(master.device),
                    "exp_avg_sq": exp_avg_sq.to(master.device),
                }
            restored = {k: v for k, v in group.items() if k != "params"}
            restored.update(params=[index], lr=values.lr, betas=tuple(values.betas))
            torch_state["param_groups"].append(restored)
        self.optimizer.load_state_dict(torch_state)
        self.num_updates = values.num_updates
        self.skipped_steps = values.skipped_steps


def _check_context(pc: Any) -> None:
    if pc.dp_size % pc.zero1_size:
        raise ValueError(f"zero1_size={pc.zero1_size} must divide dp_size={pc.dp_size}")
    if group_size(pc.zero1_group) != pc.zero1_size:
        raise ValueError(f"zero1_group has {group_size(pc.zero1_group)} ranks but zero1_size={pc.zero1_size}")
    if group_size(pc.dp_group) != pc.dp_size:
        raise ValueError(f"dp_group has {group_size(pc.dp_group)} ranks but dp_size={pc.dp_size}")


def _build_buffers(chunks: Sequence[nn.Module], zero1_size: int, zero1_rank: int) -> List[FlatBuffer]:
    """Group trainable parameters by ``BufferKey``, each group listed in reverse registration order."""
    seen: set = set()
    groups: Dict[BufferKey, List[Tuple[str, nn.Parameter, TPShard]]] = {}
    devices = set()
    for index, chunk in enumerate(chunks):
        shards = param_shards(chunk)
        named = [(n, p) for n, p in chunk.named_parameters() if p.requires_grad and id(p) not in seen]
        for name, param in reversed(named):  # backward finishes the last layers first
            if param.dtype == torch.float16:
                raise ValueError(f"{name}: fp16 parameters need loss scaling, which is not implemented; use bf16")
            shard = shards[name]
            if shard.local_shape != tuple(param.shape):
                raise ValueError(
                    f"{name}: declared tensor shard {shard} has local shape {list(shard.local_shape)}, "
                    f"but the parameter has shape {list(param.shape)}"
                )
            seen.add(id(param))
            devices.add(param.device)
            key = BufferKey(
                chunk=index,
                dtype=param.dtype,
                decay=param.ndim >= 2,
                tp_duplicate=shard.duplicate,
                tp_partial_grad=shard.partial_grad,
            )
            groups.setdefault(key, []).append((name, param, shard))
    if not groups:
        raise ValueError("the model chunks have no trainable parameters")
    if len(devices) > 1:
        raise ValueError(f"all parameters must be on one device, found {sorted(map(str, devices))}")
    return [FlatBuffer(key, entries, zero1_size, zero1_rank) for key, entries in groups.items()]


__all__ = ["HybridZeroOptimizer"]
