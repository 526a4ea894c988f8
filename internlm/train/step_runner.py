"""One optimizer update over this rank's micro-batches, and validation: micro-batches onto the device, the
schedule's forward / backward, the global loss summed over data, context and pipeline ranks without a host sync."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from internlm.faults import kill_now, kill_point, sleep_point
from internlm.labels import IGNORE_INDEX
from internlm.model import PackedDocs
from internlm.parallel import all_reduce_

from .context_batch import split_for_context
from .model_state import ModelState

_TENSOR_KEYS = ("input_ids", "labels", "cu_seqlens", "position_ids")


def _sum_over(value: torch.Tensor, *groups: Any) -> torch.Tensor:
    """``value`` summed in place over each group in turn (size-1 groups issue nothing); returns it."""
    for group in groups:
        all_reduce_(value, group)
    return value


class StepRunner:
    """Runs a step or a validation pass of the model of the current layout (a `ModelState`) on ``device``."""

    def __init__(self, device: torch.device, timer: Optional[Any] = None) -> None:
        self.device = device
        self.timer = timer  # times the forward/backward passes (a StragglerDetector: begin() / end()) or None

    def to_device(self, micro_batch: Dict[str, Any], pc: Any = None) -> Dict[str, Any]:
        """The micro-batch's tensors on the device, plus ``docs``: its `PackedDocs` (device boundaries with the
        loader's host-side values), shared by every chunk and layer that processes it. Under context parallelism
        (``pc.cp_size > 1``) only this context rank's tokens, ``docs`` their `ContextShard` (`split_for_context`)."""
        out = dict(micro_batch)
        for key in _TENSOR_KEYS:
            out[key] = micro_batch[key].to(self.device, non_blocking=True)
        docs = PackedDocs(out["cu_seqlens"], micro_batch.get("cu_seqlens_list"), micro_batch.get("max_seqlen"))
        if pc is None:
            return dict(out, docs=docs)
        return split_for_context(out, docs, pc)

    def train_step(
        self,
        model: ModelState,
        schedule: Any,
        batch: List[Dict[str, Any]],
        lr: float,
        beta2: float,
        global_tokens: int,
        *,
        step: int,
    ) -> Tuple[torch.Tensor, Any]:
        """Global step ``step``: one optimizer update over this rank's micro-batches; returns the global
        ``(loss, step_result)`` without a host sync: the loss is a device tensor, ``step_result`` what
        ``optimizer.step()`` returns (a `StepResult`: ``grad_norm, skipped = step_result``, plus ``overflow`` /
        ``nonfinite`` / ``loss_scale``).

        ``global_tokens`` is the number of label tokens of the whole global batch (a Python int from the
        loader, the same on every rank): the loss normalisation needs no all-reduce. With fp16 the backward
        pass takes ``loss_sum * loss_scale / global_tokens`` (the scale a device scalar; every pipeline schedule
        forms the backward's loss on the last stage from this factor), the reported loss stays unscaled."""
        optimizer, pc = model.optimizer, model.pc
        scale = 1.0 / max(int(global_tokens), 1)
        batch = [self.to_device(mb, pc) for mb in batch]
        optimizer.set_lr(lr)
        optimizer.set_beta2(beta2)
        optimizer.begin_step(len(batch))
        loss_scale = getattr(optimizer, "loss_scale", None)  # fp16: the dynamic loss scale (device scalar)
        backward_scale = scale if loss_scale is None else loss_scale * scale
        if self.timer is not None:
            self.timer.begin()
        loss_sum = schedule.forward_backward(model.chunks, batch, model.loss_fn, backward_scale)
        if kill_point("step", step):  # tests only (INTERNLM_TEST_KILL_AT): kill -9 in the middle of a step
            kill_now()
        sleep_point("step", step)  # tests only (INTERNLM_TEST_SLEEP_AT): a hung or slow rank
        if self.timer is not None:
            self.timer.end()
        # the global loss before the update: a non-finite one skips it, as a non-finite gradient norm does
        # context ranks hold disjoint tokens of the same micro-batches: their loss sums add up like data ranks'
        loss_sum = _sum_over(loss_sum.detach().float().clone(), pc.dp_group, getattr(pc, "cp_group", None), pc.pp_group)
        step_result = optimizer.step(skip=~torch.isfinite(loss_sum))
        return loss_sum * scale, step_result

    @torch.no_grad()
    def validate(self, model: ModelState, schedule: Any, valid_batches: List[Dict[str, Any]]) -> float:
        """The validation loss over every rank's ``valid_batches``: the summed token loss over the tokens (one
        host read-back)."""
        pc, chunks = model.pc, model.chunks
        model.optimizer.sync_params()
        local_tokens = sum(mb["label_tokens"] for mb in valid_batches)
        tokens = _sum_over(torch.tensor(float(local_tokens), device=self.device), pc.dp_group)
        batch = [self.to_device(mb, pc) for mb in valid_batches]
        if len(chunks) > 1 and len(batch) % pc.pp_size:
            # the interleaved schedule runs micro-batches in groups of pp_size: pad with loss-free copies
            padding = dict(batch[-1], labels=torch.full_like(batch[-1]["labels"], IGNORE_INDEX))
            batch += [padding] * (pc.pp_size - len(batch) % pc.pp_size)
        for chunk in chunks:
            chunk.eval()
        loss_sum = schedule.forward_backward(chunks, batch, model.loss_fn, 1.0, forward_only=True)
        for chunk in chunks:
            chunk.train()
        loss_sum = _sum_over(loss_sum.detach().float().clone(), pc.dp_group, getattr(pc, "cp_group", None), pc.pp_group)
        return float(loss_sum / tokens.clamp(min=1))
