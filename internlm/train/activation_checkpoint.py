"""Wrappers applied to the decoder layers after the model is built, outside the model definition: activation
checkpointing (recomputation) and ``torch.compile``.

`build_model_chunks` applies them to every model chunk after tensor parallelism and initialisation:
`apply_activation_checkpointing` (``model.checkpoint``), then `compile_layers` (``model.compile``), which compiles
the code inside the checkpoint wrappers, so a recomputation reruns the compiled graphs. Both wrap methods of the
module instances in place: parameter names, state dicts and checkpoints do not change. They wrap ``forward`` only
(the training path): generation runs the layers' ``decode`` (`internlm.model.modeling`), which stays eager.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from internlm.planning.recompute import SELECTIVE, Checkpoint, checkpointed_layer_count


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    # one function for every wrapped module (dynamo traces it once for all layers): the module's own forward, or
    # the compiled one `compile_layers` put in ``_inner_forward``, under non-reentrant checkpoint
    inner = self.__dict__.get("_inner_forward") or functools.partial(type(self).forward, self)
    return checkpoint(inner, *args, use_reentrant=False, **kwargs)


def _recompute(module: nn.Module) -> None:
    module.forward = types.MethodType(_checkpointed_forward, module)


def is_recomputed(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return isinstance(forward, types.MethodType) and forward.__func__ is _checkpointed_forward


def apply_activation_checkpointing(model: nn.Module, setting: Checkpoint) -> int:
    """Recompute activations of `model`'s decoder layers in the backward instead of storing them.

    ``setting`` is ``model.checkpoint``: True (every layer), False (none), a fraction of the layers in [0, 1] (the
    first ``round(f * layers)`` of the chunk: InternLM's meaning), or a selective mode applied to every layer:
    ``"attn"`` recomputes attention's core only (`AttentionCore`: the layer keeps q, k, v, not what the attention
    kernel saves), ``"mlp"`` the MLP only (the layer keeps the MLP input, not the (tokens, F) activations).
    Returns the number of wrapped modules (layers, attention cores or MLPs).
    """
    layers = list(model.layers.values())
    if isinstance(setting, str):
        if setting not in SELECTIVE:
            raise ValueError(
                f"model.checkpoint: unknown mode {setting!r}; use True, False, a fraction, 'attn' or 'mlp'"
            )
        for layer in layers:
            _recompute(layer.self_attn.core if setting == "attn" else layer.mlp)
        return len(layers)
    count = checkpointed_layer_count(setting, len(layers))
    for layer in layers[:count]:
        _recompute(layer)
    return count


def compile_layers(model: nn.Module, **options) -> int:
    """Compile every decoder layer of `model` with ``torch.compile`` (inductor by default; ``options`` go to it).

    Apply after `apply_activation_checkpointing`: the compiled function runs inside a whole-layer checkpoint (a
    recomputation reruns the compiled graphs), and a checkpointed MLP (``"mlp"``) is traced into the layer's graph
    as a recomputed region. The attention core (`AttentionCore`, with its checkpoint under ``"attn"``) stays out of
    the graphs (``torch.compiler.disable``): its shapes follow each micro-batch's document boundaries (and
    flash-attn is opaque to dynamo), so a layer compiles into two graphs, before and after it, whose shapes depend
    only on the micro-batch size, and every layer reuses them. Methods are replaced in place (names unchanged).
    Returns the number of compiled layers.
    """
    layers = list(model.layers.values())
    for layer in layers:
        core = layer.self_attn.core
        core.forward = torch.compiler.disable(core.forward)
        compiled = torch.compile(functools.partial(type(layer).forward, layer), **options)
        if is_recomputed(layer):
            layer._inner_forward = compiled  # run inside the layer's checkpoint
        else:
            layer.forward = compiled
    return len(layers)


__all__ = ["apply_activation_checkpointing", "compile_layers"]
