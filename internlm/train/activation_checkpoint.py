"""Activation checkpointing (recomputation) of decoder layers, applied outside the model definition."""

from __future__ import annotations

import functools
from typing import Union

from torch import nn
from torch.utils.checkpoint import checkpoint


def apply_activation_checkpointing(model: nn.Module, setting: Union[bool, float]) -> int:
    """Recompute the activations of the first layers of `model` in backward instead of storing them.

    `setting` is InternLM's `model.checkpoint`: True (all layers), False (none) or a fraction of the
    layers in [0, 1]. The layer's forward is wrapped in place, so parameter names do not change.
    Returns the number of wrapped layers.
    """
    layers = list(model.layers.values())
    if setting is True:
        count = len(layers)
    elif setting is False or setting is None:
        count = 0
    else:
        count = int(round(float(setting) * len(layers)))
    for layer in layers[:count]:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    return count
