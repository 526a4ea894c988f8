"""Start-up estimate (per device, before the first step): building the model chunks of the most loaded stage on
the meta device, materialising this device's tensor shard and drawing its initial values (`InternLM.init_weights`
draws only the tiles of the shard). It is extrapolated by parameter count (`most_loaded_stage_params`) from a
measurement taken when the dry run prints (`measure_startup`, well under a few seconds): decoder layers of the same
width (as many as fit in `_PROBE_PARAMS` parameters, at least one) built on meta and cut to tensor rank 0's piece of
the phase's tensor size, of which the tensors that fit `_PROBE_PARAMS` are materialised on the CPU and initialised;
plus the one-time warm-up of the process's first meta build.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Dict

import torch
from torch import nn

from internlm.model import InternLM, InternLMConfig
from internlm.parallel import TPShard

from .params import layer_params, most_loaded_stage_params

# the measurement behind the start-up estimate initialises about this many parameters (at least one tensor)
_PROBE_PARAMS = 40_000_000
# weights of row-parallel layers are split along dim 1 (their input); the other weights along dim 0
_ROW_PARALLEL = ("o_proj.weight", "down_proj.weight")


@dataclass(frozen=True)
class StartupProbe:
    """What `measure_startup` measured: ``layers`` decoder layers of width ``hidden`` built on meta and cut to
    tensor rank 0's piece of ``tensor``, of which ``tensors`` of ``total_tensors`` parameter tensors (``params``
    values) were materialised and initialised, in ``seconds``; after a one-time warm-up of ``fixed_seconds``
    (the first meta build of a process: torch's lazy set-up)."""

    fixed_seconds: float
    seconds: float
    params: int
    layers: int
    hidden: int
    tensor: int
    tensors: int
    total_tensors: int

    @property
    def seconds_per_param(self) -> float:
        return self.seconds / max(self.params, 1)


def _rank0_piece(model: InternLM, tensor: int) -> Dict[str, TPShard]:
    """Cut every parameter of a meta ``model`` to the piece tensor rank 0 of ``tensor`` holds (as
    `internlm.parallel.parallelize_model` places them: column-parallel weights and biases along dim 0,
    row-parallel weights along dim 1, k/v replicated when the kv heads do not split); returns the records."""
    kv_split = model.config.num_kv_attention_heads % tensor == 0
    shards = {}
    for module_name, module in model.named_modules():
        for attr, param in list(module.named_parameters(recurse=False)):
            name = f"{module_name}.{attr}" if module_name else attr
            if name.endswith(_ROW_PARALLEL):
                dim = 1
            elif name.endswith(("norm.weight", "o_proj.bias")):
                dim = None  # replicated
            elif ".k_proj." in name or ".v_proj." in name:
                dim = 0 if kv_split else None
            else:
                dim = 0
            split = dim is not None and tensor > 1 and param.shape[dim] % tensor == 0
            shard = TPShard.split(param.shape, dim, 0, tensor) if split else TPShard.replicated(param.shape)
            shards[name] = shard
            local = torch.empty(shard.local_shape, dtype=param.dtype, device="meta")
            setattr(module, attr, nn.Parameter(local, requires_grad=param.requires_grad))
    return shards


def measure_startup(mc: InternLMConfig, tensor: int, seed: int = 0) -> StartupProbe:
    """Time building decoder layers of ``mc``'s width on the meta device, cutting them to tensor rank 0's piece
    of ``tensor``, materialising them on the CPU and initialising them (`InternLM.init_weights`)."""
    h = mc.hidden_size
    layers = max(1, min(mc.num_layers, int(_PROBE_PARAMS // layer_params(mc, tensor))))
    probe_config = replace(mc, num_layers=layers)
    started = time.perf_counter()
    with torch.device("meta"):  # the first build of a process pays a one-time set-up: measured apart
        InternLM(replace(mc, num_layers=1, hidden_size=2 * mc.num_attention_heads, vocab_size=8, multiple_of=2))
    fixed = time.perf_counter() - started
    started = time.perf_counter()
    with torch.device("meta"):
        model = InternLM(probe_config)
    model.embed_tokens = model.norm = model.lm_head = None  # decoder layers only
    shards = _rank0_piece(model, tensor)
    # a layer wider than the budget: materialise and initialise only its first tensors (the cost per value is
    # the same for every weight: drawing its tiles)
    kept = total = 0
    for module in model.modules():
        for attr, param in list(module.named_parameters(recurse=False)):
            total += 1
            if kept and kept + param.numel() > _PROBE_PARAMS:
                module._parameters[attr] = None
            else:
                kept += param.numel()
    model.to_empty(device="cpu")
    model.init_weights(seed, shards)
    seconds = time.perf_counter() - started
    tensors = list(model.parameters())
    return StartupProbe(fixed, seconds, sum(p.numel() for p in tensors), layers, h, tensor, len(tensors), total)


def startup_estimate(model_config: InternLMConfig, layout: Any, probe: StartupProbe) -> float:
    """Seconds for one device of the most loaded stage of ``layout`` to build and initialise its shard: ``probe``'s
    time per parameter times `most_loaded_stage_params`, plus the one-time warm-up."""
    return probe.fixed_seconds + probe.seconds_per_param * most_loaded_stage_params(model_config, layout)


__all__ = ["StartupProbe", "measure_startup", "startup_estimate"]
