"""A checkpoint written from full tensors, not by a training run: what ``tools/convert_from_hf.py`` produces.

The folder has the format of `internlm.checkpoint.files` under a one-process layout: ``model_tp0_pp0.pt`` with
every tensor replicated (training under any layout reshards it on load), meta.json (``version``, ``step`` 0,
``tokens`` 0, ``source``, ``layout``, ``model_config`` and the file's size and CRC-32), and any extra files
(a ``tokenizer.model``) beside them.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Dict, Mapping, Sequence

import torch

from internlm.parallel import Layout

from .file_io import write_file
from .files import FORMAT_VERSION, commit_checkpoint, model_file


def write_full_checkpoint(
    output: str,
    state: Mapping[str, torch.Tensor],
    model_config: Dict[str, Any],
    source: Dict[str, Any],
    extra_files: Sequence[str] = (),
) -> str:
    """Write the full state dict ``state`` (in the model's order) as checkpoint folder ``output`` of step 0;
    ``model_config``: ``InternLMConfig.to_dict()``; ``source``: where the weights came from (meta.json
    ``source``); ``extra_files``: copied into the folder under their own names. The folder is built in
    ``<output>.tmp`` and renamed over ``output`` (replacing an earlier conversion). Returns ``output``."""
    tmp = os.path.abspath(output).rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    name = model_file(0, 0)
    record = write_file({"chunks": [dict(state)], "tp_shards": [{n: None for n in state}]}, os.path.join(tmp, name))
    for path in extra_files:
        shutil.copyfile(path, os.path.join(tmp, os.path.basename(path)))
    meta = dict(
        version=FORMAT_VERSION,
        step=0,
        tokens=0,
        source=source,
        layout=Layout.create(1).to_dict(),
        model_config=model_config,
    )
    commit_checkpoint(tmp, output, meta, {name: dict(record, writer=0)})
    return output


__all__ = ["write_full_checkpoint"]
