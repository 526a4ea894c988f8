"""The ``ckpt`` section: saving, resuming and initial weights (docs/checkpoint.md)."""

import dataclasses
from typing import Annotated, Any, Dict, Optional, Union

from .. import compat
from ..keys import EQUIVALENT, key, section


def _local_folder(value: Any) -> Any:
    # InternLM spells local paths "local:path"; object stores (boto3:, volc:, oss2:) are not supported
    if not isinstance(value, str) or ":" not in value.split("/")[0]:
        return value
    scheme, _, path = value.partition(":")
    if scheme == "local":
        return path
    raise ValueError(f"storage scheme {scheme!r} is not supported; use a local path (optionally 'local:path')")


@section("ckpt")
@dataclasses.dataclass(frozen=True)
class CkptSection:
    """Checkpoints: saving, resuming and initial weights."""

    enable_save_ckpt: Annotated[bool, key(True, "save checkpoints")]
    save_ckpt_folder: Annotated[
        Optional[str],
        key(
            None,
            "checkpoint folder; None resolves to {work_dir}/checkpoints; a 'local:' prefix is dropped",
            normalize=_local_folder,
        ),
    ]
    load_ckpt_folder: Annotated[
        Optional[str],
        key(
            None,
            "checkpoint to take the initial model weights from (not the optimizer) when no checkpoint is resumed; "
            "'local:' prefix dropped; not used when load_ckpt_info is set (InternLM's precedence)",
            normalize=_local_folder,
        ),
    ]
    auto_resume: Annotated[bool, key(True, "resume from the latest checkpoint in save_ckpt_folder")]
    checkpoint_every: Annotated[int, key(50, "save every this many steps (and at the end)", minimum=1)]
    keep_last: Annotated[int, key(3, "most recent checkpoints kept on disk; 0 keeps all", minimum=0)]
    async_save: Annotated[
        bool,
        key(
            False,
            "write checkpoint files from a CPU copy in a background thread while training goes on; a checkpoint "
            "counts once complete, at the next save, the end of training or a stop (docs/checkpoint.md)",
        ),
    ]
    async_upload: Annotated[
        bool,
        key(
            False,
            "InternLM compatibility; only False (no object-store upload; ckpt.async_save writes in the background)",
            compat=EQUIVALENT,
            normalize=compat.async_upload,
        ),
    ]
    async_upload_tmp_folder: Annotated[
        Optional[str],
        key(
            None,
            "InternLM compatibility; any value: InternLM uses it only with async_upload=True, which is rejected",
            compat=EQUIVALENT,
        ),
    ]
    oss_snapshot_freq: Annotated[
        Union[int, float, None],
        key(
            None,
            "InternLM compatibility: None, <= 1 (InternLM's off) or a multiple of checkpoint_every (those snapshot "
            "steps are normal checkpoints in InternLM too); other values are rejected: use checkpoint_every",
            compat=EQUIVALENT,
        ),
    ]
    load_ckpt_info: Annotated[
        Optional[Dict[str, Any]],
        key(
            None,
            "InternLM's dict(path=..., content=('model',) | ('model', 'optimizer', 'scheduler', 'sampler') | "
            "('all',), ckpt_type='internlm' | 'hf'): the checkpoint (or Hugging Face folder) a run starts from; as in "
            "InternLM it is used only with ckpt.auto_resume=False (docs/checkpoint.md)",
            normalize=compat.load_ckpt_info,
        ),
    ]
    stop_file_path: Annotated[
        Optional[str],
        key(
            None,
            "when this file appears, save and stop after the step it names "
            "(at once if it is empty); the file is then removed",
        ),
    ]
    snapshot_ckpt_folder: Annotated[
        Optional[str],
        key(
            None,
            "InternLM compatibility; any value: used only by snapshot checkpoints (see oss_snapshot_freq)",
            compat=EQUIVALENT,
        ),
    ]


__all__ = ["CkptSection"]
