"""`InternLM.from_pretrained`: a model from a training checkpoint or a Hugging Face folder, with no random init.

The model is built on the meta device (no memory, no initialisation), its storage allocated uninitialised on the
target device (``to_empty``), and each weight copied into place as it is read: one tensor at a time from the
memory-mapped checkpoint files (`internlm.checkpoint.reader.CheckpointReader`, which picks the step and returns
the recorded config as a dict) or the HF weight files (`iter_hf_tensors`), so the model is never resident twice.

    model = InternLM.from_pretrained("work_dirs/demo")                 # newest verified checkpoint of a run
    model = InternLM.from_pretrained("work_dirs/demo", step=200)       # a given step
    model = InternLM.from_pretrained("work_dirs/demo/checkpoints/200") # one step folder
    model = InternLM.from_pretrained("hf_out", dtype=torch.bfloat16, device="cuda")  # HF folder (config.json)
"""

from __future__ import annotations

import ast
import dataclasses
import os
from typing import Iterable, Optional, Tuple, Type, TypeVar, Union

import torch
from torch import nn

from internlm.checkpoint.files import META_FILE
from internlm.checkpoint.reader import CheckpointReader, find_checkpoint, recorded_config_files

from .config import InternLMConfig, parse_dtype
from .hf import is_hf_folder, iter_hf_tensors

M = TypeVar("M", bound=nn.Module)


def resolve_source(path: Union[str, os.PathLike], step: Optional[int] = None) -> Tuple[str, str]:
    """``("hf", folder)`` for a Hugging Face folder, else ``("checkpoint", step folder)`` (`find_checkpoint`)."""
    path = os.fspath(path)
    if is_hf_folder(path):
        if step is not None:
            raise ValueError(f"{path} is a Hugging Face folder: step={step} applies to training checkpoints only")
        return "hf", path
    return "checkpoint", find_checkpoint(path, step)


def checkpoint_config(reader: CheckpointReader) -> InternLMConfig:
    """The `InternLMConfig` recorded in a checkpoint's meta.json (``model_config``)."""
    recorded = reader.model_config
    try:
        return InternLMConfig.from_dict(recorded)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint {reader.path}: {META_FILE} model_config: {exc}") from None


def load_config(path: Union[str, os.PathLike], step: Optional[int] = None) -> InternLMConfig:
    """The model config of a checkpoint (its meta.json) or HF folder (its config.json)."""
    kind, folder = resolve_source(path, step)
    return InternLMConfig.from_hf(folder) if kind == "hf" else checkpoint_config(CheckpointReader(folder))


@torch.no_grad()
def load_tensors(model: nn.Module, tensors: Iterable[Tuple[str, torch.Tensor]], source: str) -> None:
    """Copy each ``(name, tensor)`` into ``model``'s parameter of that name (converting dtype and device).
    Raises KeyError / ValueError naming ``source`` and the tensor for an unknown, misshapen or missing one."""
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    loaded = set()
    for name, tensor in tensors:
        if name not in params:
            raise KeyError(f"{source}: tensor {name!r} is not a parameter of this model (config mismatch?)")
        target = params[name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(f"{source}: {name} has shape {list(tensor.shape)}, the model expects {list(target.shape)}")
        target.copy_(tensor)
        loaded.add(name)
    missing = sorted(n for n in params if n not in loaded)  # to_empty left them uninitialised
    if missing:
        raise KeyError(f"{source} lacks {len(missing)} model tensors: {', '.join(missing[:8])}")


def from_pretrained(
    cls: Type[M],
    path: Union[str, os.PathLike],
    dtype: Optional[Union[str, torch.dtype]] = None,
    device: Optional[Union[str, torch.device]] = None,
    step: Optional[int] = None,
) -> M:
    """``cls(config)`` with the weights of ``path``: a training checkpoint (work_dir, its checkpoints folder, or a
    step folder; the newest verified step unless ``step``) or a Hugging Face folder (config.json + safetensors or
    pytorch_model.bin, sharded or not). ``dtype`` (default: the saved config's) and ``device`` (default CPU) of the
    parameters. Returned in eval mode."""
    kind, folder = resolve_source(path, step)
    if kind == "hf":
        config = InternLMConfig.from_hf(folder)
        tensors: Iterable[Tuple[str, torch.Tensor]] = iter_hf_tensors(folder)
    else:
        reader = CheckpointReader(folder)
        config = checkpoint_config(reader)
        tensors = reader.iter_tensors()
    if dtype is not None:
        config = dataclasses.replace(config, dtype=parse_dtype(dtype))
    with torch.device("meta"):
        model = cls(config)  # parameters on meta: InternLM skips init_weights
    model.to_empty(device=torch.device(device) if device is not None else torch.device("cpu"))
    load_tensors(model, tensors, folder)
    return model.eval()


def _literal_tokenizer_path(config_file: str) -> Optional[str]:
    """The ``tokenizer_path`` string literal of a config file (``data = dict(tokenizer_path=...)``), read with
    ``ast`` (the model package does not load run configs)."""
    try:
        with open(config_file, encoding="utf-8") as f:
            tree = ast.parse(f.read(), config_file)
    except (OSError, SyntaxError, ValueError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "tokenizer_path" and isinstance(node.value, ast.Constant):
            return node.value.value if isinstance(node.value.value, str) else None
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "tokenizer_path" and isinstance(value, ast.Constant):
                    return value.value if isinstance(value.value, str) else None
    return None


def find_tokenizer(path: Union[str, os.PathLike], step: Optional[int] = None) -> Optional[str]:
    """The SentencePiece model of a checkpoint or HF folder, or None: ``tokenizer.model`` in the folder, else the
    run's ``data.tokenizer_path`` as recorded in the work_dir's resolved config (``config_<phase>.py``) or the
    phase config file named in meta.json."""
    kind, folder = resolve_source(path, step)
    own = os.path.join(folder, "tokenizer.model")
    if os.path.isfile(own) or kind == "hf":
        return own if os.path.isfile(own) else None
    for config_file in recorded_config_files(folder):
        found = _literal_tokenizer_path(config_file)
        if found and os.path.isfile(found):
            return found
    return None


__all__ = ["checkpoint_config", "find_tokenizer", "from_pretrained", "load_config", "load_tensors", "resolve_source"]
