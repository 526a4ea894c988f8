"""What a run starts from: auto-resume, InternLM's ``ckpt.load_ckpt_info``, or ``ckpt.load_ckpt_folder``.

Precedence (InternLM's, from its ``CheckpointManager``: "auto-reload latest checkpoint, it will overwrite the
setting of 'load_ckpt_info'"):

1. ``ckpt.auto_resume=True``: the newest complete checkpoint of ``save_ckpt_folder`` is resumed (model,
   optimizer, schedules, data position); with none, the run starts from scratch. ``load_ckpt_info`` is then
   **not used** at all, as in InternLM (a line at start-up says so).
2. ``ckpt.auto_resume=False`` and ``load_ckpt_info=dict(path, content, ckpt_type)`` with a path: ``content`` picks
   what comes from ``path``: ``model`` (weights; a Hugging Face folder with ``ckpt_type="hf"``), ``optimizer``
   (fp32 masters, AdamW moments, loss scale), ``scheduler`` (the training position: step, tokens and phase, so the
   learning-rate and beta2 schedules continue), ``sampler`` (the data position); ``("all",)`` is all four.
   Every rerun with ``auto_resume=False`` starts from ``path`` again.
3. Otherwise ``ckpt.load_ckpt_folder`` (ours): model weights only, when no checkpoint is resumed
   (``load_ckpt_info`` takes precedence over it, as in InternLM).

This module decides where each part comes from (the trainer's precedence); the loading itself is the checkpoint
package's: any layout works, our checkpoints are resharded on load and a Hugging Face folder's full tensors are
cut into this rank's tensor shards by the same arithmetic (`internlm.checkpoint.reshard`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple


@dataclass(frozen=True)
class StartPlan:
    """Where each part of the initial state comes from (None: fresh, or nothing to load).

    ``resume_path``: the checkpoint the training position (and with it the model) is taken from;
    ``weights_from``/``weights_type``: initial weights when there is no ``resume_path``; ``optimizer_from``,
    ``sampler_from``: the optimizer state and data position; ``messages``: what to print at start-up.
    """

    resume_path: Optional[str] = None
    weights_from: Optional[str] = None
    weights_type: str = "internlm"
    optimizer_from: Optional[str] = None
    sampler_from: Optional[str] = None
    messages: Tuple[str, ...] = ()


def _info_text(info: Mapping[str, Any]) -> str:
    return f"ckpt.load_ckpt_info (path {info['path']}, content {', '.join(info['content'])}, {info['ckpt_type']})"


def plan_start(ckpt: Any, latest: Optional[str]) -> StartPlan:
    """The `StartPlan` of a run from its ``ckpt`` section and the checkpoint auto-resume found (``latest``, None
    when ``auto_resume`` is off or found none), by the precedence of the module docstring."""
    info = ckpt.load_ckpt_info if ckpt.load_ckpt_info and ckpt.load_ckpt_info.get("path") else None
    if ckpt.auto_resume:
        messages: Tuple[str, ...] = ()
        if info is not None:
            messages = (
                f"warning: {_info_text(info)} is not used: ckpt.auto_resume=True takes precedence (InternLM's rule: "
                f"it {'resumes ' + latest if latest else 'found no checkpoint, so the run starts from scratch'}); "
                "set ckpt.auto_resume=False to start from it",
            )
        if latest is not None:
            return StartPlan(resume_path=latest, optimizer_from=latest, sampler_from=latest, messages=messages)
        if info is None and ckpt.load_ckpt_folder:
            return StartPlan(weights_from=ckpt.load_ckpt_folder, messages=messages)
        return StartPlan(messages=messages)
    if info is not None:
        path, content = info["path"], set(info["content"])
        text = f"starting from {_info_text(info)}"
        if ckpt.load_ckpt_folder:
            text += f"; ckpt.load_ckpt_folder ({ckpt.load_ckpt_folder}) is not used (load_ckpt_info takes precedence)"
        return StartPlan(
            resume_path=path if "scheduler" in content else None,
            weights_from=None if "scheduler" in content else path,
            weights_type=info["ckpt_type"],
            optimizer_from=path if "optimizer" in content else None,
            sampler_from=path if "sampler" in content else None,
            messages=(text,),
        )
    if ckpt.load_ckpt_folder:
        return StartPlan(weights_from=ckpt.load_ckpt_folder)
    return StartPlan()


_SHAPE_FIELDS = ("hidden_size", "num_layers", "num_attention_heads", "num_kv_attention_heads", "vocab_size")


def check_start_plan(
    ckpt: Any, has_checkpoint: bool, file: Optional[str] = None, model_config: Any = None
) -> StartPlan:
    """The run's `StartPlan` (``has_checkpoint``: auto-resume will find one), after checking at start-up that a
    ``ckpt.load_ckpt_info`` path it uses exists, and for a Hugging Face folder that its config.json describes the
    shape of ``model_config`` (when given); raises ConfigError naming what differs."""
    from internlm.config import ConfigError

    plan = plan_start(ckpt, "the latest checkpoint" if has_checkpoint else None)
    info = ckpt.load_ckpt_info
    if ckpt.auto_resume or not info or not info.get("path"):
        return plan
    path = info["path"]
    if not os.path.isdir(path):
        raise ConfigError("ckpt.load_ckpt_info", f"path {path} is not a folder; point it at a checkpoint", file)
    if info["ckpt_type"] == "hf":
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError("ckpt.load_ckpt_info", f"{path} has no config.json: not a Hugging Face folder", file)
        if model_config is not None:
            from internlm.model.config import InternLMConfig

            theirs = InternLMConfig.from_hf(path)
            differ = [
                f"{k} {getattr(theirs, k)} (model.{k} {getattr(model_config, k)})"
                for k in _SHAPE_FIELDS
                if getattr(theirs, k) != getattr(model_config, k)
            ]
            if differ:
                raise ConfigError(
                    "ckpt.load_ckpt_info",
                    f"{path} holds another model: {', '.join(differ)}; set the model keys to the folder's config.json",
                    file,
                )
    return plan


def start_text(ckpt: Any) -> str:
    """The banner's note on initial weights when nothing is resumed (empty when there is none)."""
    info = ckpt.load_ckpt_info if ckpt.load_ckpt_info and ckpt.load_ckpt_info.get("path") else None
    if info is not None and ckpt.auto_resume:
        return f", {_info_text(info)} not used (ckpt.auto_resume=True takes precedence)"
    if info is not None:
        return f", starting from {_info_text(info)}"
    return f", initial weights from {ckpt.load_ckpt_folder}" if ckpt.load_ckpt_folder else ""


__all__ = ["StartPlan", "plan_start", "check_start_plan", "start_text"]
