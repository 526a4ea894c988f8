"""Weights & Biases, an optional logger beside TensorBoard (``monitor.wandb = dict(project=..., mode=...)``): every
metrics.jsonl record's numbers go to ``wandb.log`` at its step, under the TensorBoard tags (`metrics.scalar_tag`).
``mode="offline"`` writes the run under ``dir`` (default ``{work_dir}``/wandb) with no network; ``wandb sync``
uploads it later."""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping


class WandbLogger:
    """One wandb run for the logging rank. ``settings``: ``monitor.wandb``; ``tag(key)``: the scalar's name."""

    def __init__(self, settings: Mapping[str, Any], work_dir: str, tag: Callable[[str], str]) -> None:
        try:
            import wandb
        except ImportError:
            raise RuntimeError("monitor.wandb is set but wandb is not installed: pip install wandb") from None
        folder = settings.get("dir") or os.path.join(work_dir, "wandb")
        os.makedirs(folder, exist_ok=True)
        self.tag = tag
        self.run = wandb.init(
            project=settings["project"],
            mode=settings.get("mode", "online"),
            name=settings.get("name"),
            entity=settings.get("entity"),
            group=settings.get("group"),
            tags=settings.get("tags"),
            dir=folder,
        )

    def log(self, record: Mapping[str, Any]) -> None:
        """The record's finite numbers (not bools) at its ``step``."""
        data = {
            self.tag(key): value
            for key, value in record.items()
            if key != "step"
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
        }
        if data:
            self.run.log(data, step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


__all__ = ["WandbLogger"]
