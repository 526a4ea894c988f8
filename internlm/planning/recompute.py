"""Activation checkpointing (``model.checkpoint``) as the planner and the runtime both count it.

The setting is True (every decoder layer recomputed whole), False / None (none), a fraction f in [0, 1] (the first
``round(f * layers)`` layers of every model chunk: InternLM's meaning), or a selective mode applied to every layer:
``"attn"`` (attention's core) or ``"mlp"`` (the MLP). `internlm.train.activation_checkpoint` wraps the modules;
the memory and step-time models count the same layers through `checkpointed_layer_count`.
"""

from __future__ import annotations

import argparse
from typing import Optional, Union

Checkpoint = Union[bool, float, str, None]

SELECTIVE = ("attn", "mlp")


def checkpointed_layer_count(setting: Checkpoint, layers: int) -> int:
    """Layers of a chunk recomputed whole: all for True, none for False/None and the selective modes, else
    ``round(setting * layers)`` (InternLM's fraction: the first layers of the chunk)."""
    if setting is True:
        return layers
    if setting is False or setting is None or isinstance(setting, str):
        return 0
    return int(round(float(setting) * layers))


def selective_mode(checkpoint: Checkpoint) -> Optional[str]:
    """``"attn"`` or ``"mlp"`` for a selective ``model.checkpoint``, else None."""
    return checkpoint if isinstance(checkpoint, str) else None


def parse_checkpoint(text: str) -> Checkpoint:
    """A ``model.checkpoint`` value from command-line text: true/false (and yes/no/on/off), a fraction in [0, 1],
    ``attn`` or ``mlp`` (every mode the config accepts)."""
    low = str(text).strip().lower()
    if low in ("true", "yes", "on", "1.0"):
        return True
    if low in ("false", "no", "off", "0", "0.0", "none"):
        return False
    if low in SELECTIVE:
        return low
    try:
        value = float(low)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"--checkpoint: True, False, a fraction in [0, 1], 'attn' or 'mlp' (as model.checkpoint), got {text}"
        )
    return value


def checkpoint_text(checkpoint: Checkpoint) -> str:
    """How reports print a setting: ``True``, ``0.5``, ``attn``."""
    return f"{checkpoint:g}" if isinstance(checkpoint, float) else str(checkpoint)


__all__ = [
    "Checkpoint",
    "SELECTIVE",
    "checkpointed_layer_count",
    "selective_mode",
    "parse_checkpoint",
    "checkpoint_text",
]
