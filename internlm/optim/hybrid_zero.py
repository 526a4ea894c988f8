"""InternLM's hybrid ZeRO stage 1: fp32 master weights and AdamW moments sharded over the zero1 group.

Per step, on every rank (see docs/zero.md for the volumes)::

    begin_step(n) -> n x backward        gradients accumulate in fp32 buffers; ready buckets reduce-scatter
                                         over the zero1 group, then all-reduce the owned piece over the zero1
                                         replicas, while backward continues
    step()                               finish the buckets; sum partial-gradient slices over the tensor group;
                                         global grad norm (one scalar all-reduce per zero1/tp/pp group);
                                         clip + fused AdamW on this rank's fp32 slice, skipped on device when
                                         the norm is inf/nan (no host sync); copy the slice into the model
                                         dtype; launch the all-gather of every bucket over zero1
    next forward                         a forward pre-hook on each module waits for its parameters' buckets

``zero1_size`` may be smaller than ``dp_size`` (hybrid): data-parallel ranks form ``dp_size / zero1_size``
consecutive blocks, each block shards the optimizer state once, and blocks hold identical replicas.

Each parameter's tensor-parallel placement is its `TPShard` (`internlm.parallel.param_shards`): duplicates
are counted once in the grad norm, partial gradients are summed over the tensor group, and the checkpoint
formats record the shard. Checkpoint helpers (`shard_state.py`, `full_state.py`) work on values; this class
turns its AdamW state into `StateValues` and installs the ones a load returns.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from internlm.parallel.comm import group_size
from internlm.parallel.tp_shard import TPShard, param_shards

from .collectives import ParamGatherer
from .flat_buffer import BufferKey, FlatBuffer
from .full_state import cut_full_state
from .grad_norm import global_grad_norm
from .grad_scaler import DynamicGradScaler
from .grad_sync import GradReducer
from .shard_state import StateValues, read_shard_state, shard_ranks, shard_state
from .step_result import StepResult


class HybridZeroOptimizer:
    """AdamW over flat sharded fp32 master weights, with bucketed overlapped gradient reduction.

    ``pc`` is any object with ``dp_size, dp_rank, dp_group, zero1_size, zero1_rank, zero1_group, tp_size,
    tp_rank, tp_group, pp_size, pp_group`` and, when ``dp_size * cp_size > zero1_size``, ``zero1_replica_group`` (groups
    are ``None`` for size 1). Weight decay applies to parameters with two or more dimensions (matrices,
    embeddings), not to norm weights or biases.

    ``step()`` never waits for the device: the skip decision, the clip coefficient and the counters stay device
    tensors. ``skipped_steps`` and ``num_updates`` read as ints (that read synchronises).
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
        grad_scaler: Optional[DynamicGradScaler] = None,
    ) -> None:
        _check_context(pc)
        self.pc = pc
        self.model_chunks = list(model_chunks)
        self.clip_grad_norm = clip_grad_norm
        self.overlap_sync_param = overlap_sync_param

        # fp16 parameters need dynamic loss scaling (model.dtype torch.float16): the loss is multiplied by
        # ``grad_scaler.scale`` before backward and the fp32 gradients divided by it again in ``step()``
        self.grad_scaler = grad_scaler
        self.buffers = _build_buffers(
            self.model_chunks, pc.zero1_size, pc.zero1_rank, reduce_bucket_size // 4, grad_scaler is not None
        )
        self.grad_reducer = GradReducer(
            self.buffers, pc.zero1_group, getattr(pc, "zero1_replica_group", None), pc.tp_group, overlap_sync_grad
        )
        self.gatherer = ParamGatherer(self.buffers, pc.zero1_group, self.model_chunks)
        self.grad_reducer.before_accumulate = self.gatherer.wait_buffer
        # counters on the device, so that step() never reads a value back (properties below convert on read)
        device = self.buffers[0].params.device
        self._num_updates = torch.zeros((), dtype=torch.int64, device=device)  # AdamW steps applied
        self._skipped_steps = torch.zeros((), dtype=torch.int64, device=device)
        # fp32 master copy of the owned slice; its .grad is the reduced fp32 gradient of the owned slice
        self.masters: List[torch.Tensor] = []
        for buffer in self.buffers:
            master = buffer.param_shard().detach().to(torch.float32, copy=True)
            master.grad = buffer.grad_shard()
            self.masters.append(master)
        groups = [
            {"params": [master], "weight_decay": weight_decay if buffer.key.decay else 0.0}
            for buffer, master in zip(self.buffers, self.masters)
        ]
        # fused (CUDA and CPU kernels): reads self.optimizer.found_inf and skips the update and the step count
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)

    # ------------------------------------------------------------------ counters
    @property
    def num_updates(self) -> int:
        """AdamW steps applied (skipped steps excluded). Reading it synchronises with the device."""
        return int(self._num_updates)

    @num_updates.setter
    def num_updates(self, value: int) -> None:
        self._num_updates.fill_(int(value))

    @property
    def skipped_steps(self) -> int:
        """Steps skipped on an inf/nan gradient norm. Reading it synchronises with the device."""
        return int(self._skipped_steps)

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped_steps.fill_(int(value))

    # ------------------------------------------------------------------ step protocol
    def begin_step(self, num_micro_batches: int) -> None:
        """Arm the gradient hooks: each parameter's gradient is final after ``num_micro_batches`` backward passes."""
        self.grad_reducer.begin_step(num_micro_batches)

    @property
    def loss_scale(self) -> Optional[torch.Tensor]:
        """The fp32 device scalar the loss is multiplied by before backward (fp16), or None without loss scaling."""
        return None if self.grad_scaler is None else self.grad_scaler.scale

    @torch.no_grad()
    def step(self, skip: Optional[torch.Tensor] = None) -> "StepResult":
        """Reduce, unscale, clip and apply this step's gradients; returns a `StepResult`: it unpacks as
        ``(grad_norm, skipped)`` (fp32 and bool device scalars: convert them only when they are logged) and
        carries ``overflow``, ``nonfinite`` and ``loss_scale``.

        The norm is taken before clipping. A non-finite norm skips the update on every rank (the norm is the same
        everywhere): ``found_inf`` goes to the fused AdamW kernel, which then leaves masters, moments and its step
        count untouched; the gradients are dropped and ``skipped_steps`` counts it. Nothing here reads a device
        value on the host.

        With a grad scaler (fp16) the gradients hold ``scale * g``: the norm of the scaled gradients decides the
        overflow (its all-reduce over the zero1, tensor and pipeline groups, after the data-parallel reduction,
        makes it the same on every rank), the reported norm is ``norm / scale``, the gradients are multiplied by
        ``min(1, clip / (norm / scale + 1e-6)) / scale`` in one pass, and the scaler is updated (InternLM's
        order: update, then skip on overflow).

        ``skip``: a bool device scalar, the same on every rank (the trainer's: the global loss is not finite),
        that skips the update like a non-finite norm does.
        """
        self.grad_reducer.finish()
        norm = global_grad_norm(self.buffers, self.pc.zero1_group, self.pc.tp_group, self.pc.pp_group, self.pc.tp_rank)
        grad_inf = ~torch.isfinite(norm)
        found_inf = grad_inf.to(torch.float32)
        if skip is not None:
            found_inf = torch.maximum(found_inf, skip.to(torch.float32))
        scaler = self.grad_scaler
        unscale = None
        if scaler is not None:
            unscale = scaler.inv_scale
            norm = norm * unscale  # the norm of the true gradients
        coef = unscale
        if self.clip_grad_norm is not None and self.clip_grad_norm > 0:
            # as torch.nn.utils.clip_grad_norm_: coefficient min(1, max_norm / (norm + 1e-6)), in fp32 (nan when
            # the norm is: harmless, the update is skipped then)
            coef = (self.clip_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            coef = coef if unscale is None else coef * unscale
        if coef is not None:
            torch._foreach_mul_([master.grad for master in self.masters], coef)
        overflow = torch.zeros((), dtype=torch.bool, device=norm.device)
        if scaler is not None:
            # only the scaled gradients' overflow drives the scaler (a non-finite loss, ``skip``, is no scaling
            # matter); one the scaler absorbs (it can still back off) is routine, at min_scale it is not
            scaled_overflow = grad_inf if skip is None else grad_inf & ~skip.to(torch.bool)
            overflow = scaled_overflow & ~scaler.at_min_scale()
            scaler.update(scaled_overflow)
        self.optimizer.found_inf = found_inf
        try:
            self.optimizer.step()
        finally:
            self.optimizer.found_inf = None
        skipped = found_inf.to(torch.int64)
        self._skipped_steps += skipped
        self._num_updates += 1 - skipped
        # a skipped step republishes unchanged masters: the same values, no branch on the host
        self._publish_params(async_op=self.overlap_sync_param)
        skipped = found_inf > 0
        return StepResult(norm, skipped, overflow, None if scaler is None else scaler.scale.clone())

    def zero_grad(self) -> None:
        """Drop accumulated gradients (also disarms the step's hooks)."""
        self.sync_params()  # in-flight parameter gathers receive into the gradient accumulation tensors
        self.grad_reducer.zero()

    # ------------------------------------------------------------------ parameter all-gather
    @torch.no_grad()
    def _publish_params(self, async_op: bool) -> None:
        """Copy each fp32 master slice into the model dtype and all-gather the slices over the zero1 group, bucket
        by bucket (`ParamGatherer`). The gathers receive into the gradient accumulation tensors, so any gradient
        accumulated and not yet reduced is dropped; after completion those tensors are zero."""
        self.sync_params()  # a gather still in flight (no forward since the last step) reads the slice we overwrite
        for buffer, master in zip(self.buffers, self.masters):
            buffer.param_shard().copy_(master)
        self.gatherer.launch(async_op)

    @property
    def param_sync_pending(self) -> bool:
        """True while a parameter all-gather launched by ``step()`` has not been waited for."""
        return self.gatherer.pending

    def sync_params(self) -> None:
        """Wait until every model parameter holds the gathered values of the last step (before save or eval)."""
        self.gatherer.wait_all()

    def close(self) -> None:
        """Detach from the model: finish in-flight collectives, remove gradient and forward hooks.

        The parameters keep their current values (still views of this optimizer's buffer until a new
        optimizer flattens them again), so a fresh optimizer can be built on the same chunks.
        """
        self.sync_params()
        self.grad_reducer.zero()
        self.grad_reducer.remove_hooks()
        self.gatherer.remove_hooks()

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

    def state_dict(self, copy: bool = True, device: Any = None) -> Dict[str, Any]:
        """This rank's shard (master weights, AdamW moments, counters) with its layout metadata.

        Tensors are copies (onto ``device`` if given: a checkpoint's CPU snapshot); ``copy=False`` hands out
        the live tensors, for a caller that writes them before the next ``step()``.
        """
        state = shard_state(shard_ranks(self.pc), self.buffers, self._state_values(), copy=copy, device=device)
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()  # the same on every rank
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a shard saved under the same layout; raises ValueError naming any layout difference
        (another layout goes through ``load_full_state``).

        Collective over the zero1 group: the restored master slices are gathered into the model parameters.
        """
        self.sync_params()
        self._install_state(read_shard_state(state, shard_ranks(self.pc), self.buffers), owned=False)
        self._load_scaler(state.get("grad_scaler"))
        self._publish_params(async_op=False)

    def load_full_state(self, full: Any) -> None:
        """Restore from a layout-independent full state: a lazy `ShardedFullState` over a checkpoint's
        memory-mapped shards (``internlm.checkpoint.reshard.load_optimizer_resharded``) or a materialised dict
        (``merge_optimizer_checkpoint``). For every buffer, the owned slice of each parameter's fp32 master,
        ``exp_avg`` and ``exp_avg_sq`` within the parameter's own tensor shard is copied straight into this
        optimizer's master slices and new moment tensors; then the counters, lr and betas.

        Any saved layout works (see ``full_state.py`` for the index arithmetic). Collective over the zero1
        group: the restored master slices are gathered into the model parameters.
        """
        self.sync_params()
        self._install_state(cut_full_state(full, self.buffers, masters=self.masters), owned=True)
        self._load_scaler(full.get("grad_scaler") if isinstance(full, Mapping) else getattr(full, "grad_scaler", None))
        self._publish_params(async_op=False)

    def _load_scaler(self, saved: Optional[Mapping[str, Any]]) -> None:
        """Restore the loss scale saved with the state (a checkpoint without one, e.g. from a bf16 run, keeps
        the configured initial scale; a saved scale is ignored by a run without loss scaling)."""
        if self.grad_scaler is not None and saved is not None:
            self.grad_scaler.load_state_dict(saved)

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
    def _install_state(self, values: StateValues, owned: bool = False) -> None:
        """Copy ``values`` in: the master slices, AdamW's moments (none: no update yet, no state) with step count
        ``num_updates``, the counters, lr and betas. Each param group keeps its own weight decay (it follows the
        buffer kind, not the saved state).

        ``owned``: the moment tensors are new and on this optimizer's device (`cut_full_state`) and become
        AdamW's state as they are; otherwise (e.g. memory-mapped checkpoint tensors) they are copied."""
        for master, saved in zip(self.masters, values.masters):
            if saved is not master:
                master.copy_(saved)

        def take(moment: torch.Tensor, master: torch.Tensor) -> torch.Tensor:
            if owned and moment.device == master.device:
                return moment
            return torch.empty_like(master).copy_(moment)

        torch_state: Dict[str, Any] = {"state": {}, "param_groups": []}
        for index, (master, group) in enumerate(zip(self.masters, self.optimizer.param_groups)):
            if values.moments is not None:
                exp_avg, exp_avg_sq = values.moments[index]
                torch_state["state"][index] = {
                    "step": torch.tensor(float(values.num_updates), dtype=torch.float32),
                    "exp_avg": take(exp_avg, master),
                    "exp_avg_sq": take(exp_avg_sq, master),
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
    # context ranks hold the same weights as data ranks: the replica group sums their gradients too
    replicas = group_size(getattr(pc, "zero1_replica_group", None))
    expected = pc.dp_size // pc.zero1_size * getattr(pc, "cp_size", 1)
    if replicas != expected:
        raise ValueError(f"zero1_replica_group has {replicas} ranks but dp_size / zero1_size * cp_size = {expected}")


def _build_buffers(
    chunks: Sequence[nn.Module], zero1_size: int, zero1_rank: int, bucket_numel: int, loss_scaling: bool = False
) -> List[FlatBuffer]:
    """Group trainable parameters by ``BufferKey``, each group given in reverse registration order (the order
    backward finishes them; `FlatBuffer` deals them into zero1 lanes)."""
    seen: set = set()
    groups: Dict[BufferKey, List[Tuple[str, nn.Parameter, TPShard]]] = {}
    devices = set()
    for index, chunk in enumerate(chunks):
        shards = param_shards(chunk)
        named = [(n, p) for n, p in chunk.named_parameters() if p.requires_grad and id(p) not in seen]
        for name, param in reversed(named):  # backward finishes the last layers first
            if param.dtype == torch.float16 and not loss_scaling:
                raise ValueError(f"{name}: fp16 parameters need loss scaling: pass a DynamicGradScaler (grad_scaler)")
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
    return [FlatBuffer(key, entries, zero1_size, zero1_rank, bucket_numel) for key, entries in groups.items()]


__all__ = ["HybridZeroOptimizer", "StepResult"]
