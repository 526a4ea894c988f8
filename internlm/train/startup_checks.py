"""Checks run once at start-up, before any model is built or file written: each bad input found here stops the
run with exit status 2 and one line naming the file or key and what to do (docs/troubleshooting.md).

`start_up` is the entry point (called by `run_training` on every rank): rank 0 takes the work_dir lock
(`WorkDirLock`) and runs `startup_checks`; its verdict is broadcast, so every rank stops alike and only rank 0
prints. The checks, in order:

- the checkpoint folder: a ``.tmp-<step>`` folder left by a save that did not complete is named with its size
  and removed (when this run saves: its next save would remove it), writable (a probe file is created and
  removed), free space >= one checkpoint
  (`internlm.planning.checkpoint_bytes`: weights + fp32 master and Adam moments), no ``<step>/`` folder holding
  files without meta.json, the newest readable checkpoint of this model (`model_difference`) and its model.dtype
  (`_check_dtype`: resuming under another dtype is refused), at least one complete
  checkpoint whose files have their recorded sizes (the CRC-32 check itself runs when the trainer resumes,
  spread over the ranks), and ``ckpt.load_ckpt_folder``'s model files and model when it will be loaded; the
  files of either whose pickle would run code are refused (`check_checkpoint_files`, a scan without loading);
- every phase's data: the loaders are built (each shard's .bin.meta or Megatron .idx read, sizes and document
  tables checked), the shards' recorded vocabulary fits model.vocab_size, and the validation windows' token ids are
  < model.vocab_size (training windows are checked as they are read: `internlm.data.sources.check_window_ids`);
- the tokenizer (``data.tokenizer_path``): a SentencePiece model whose vocabulary fits model.vocab_size.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Callable, Dict, List, Mapping, Optional

from internlm.checkpoint import META_FILE, checkpoint_problems, complete_checkpoints, partial_saves, read_meta
from internlm.checkpoint.safe_load import check_checkpoint_files
from internlm.config import ConfigError, RunConfig
from internlm.errors import BadInputError, CheckpointError
from internlm.planning import checkpoint_bytes

from .initial_load import check_start_plan
from .lock import WorkDirLock
from .metrics import format_bytes
from .phases import Phase


def metaless_folders(root: str) -> Dict[str, List[str]]:
    """``{path: file names}`` of the ``<step>/`` folders under ``root`` that hold files but no meta.json: not
    checkpoints (a copy cut short, meta.json deleted), yet a save of that step would replace them."""
    out: Dict[str, List[str]] = {}
    if not os.path.isdir(root):
        return out
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.isdigit() and os.path.isdir(path) and not os.path.exists(os.path.join(path, META_FILE)):
            files = sorted(os.listdir(path))
            if files:
                out[path] = files
    return out


# model_config keys that fix the shapes of the weights (intermediate_size, when both record it, replaces
# mlp_ratio and multiple_of, which only derive it)
_SHAPE_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_kv_attention_heads", "qkvo_bias")


def model_difference(saved: Mapping[str, Any], current: Mapping[str, Any]) -> List[str]:
    """How the model recorded in a checkpoint's meta.json (``model_config``) differs in shape from ``current``
    (`InternLMConfig.to_dict()`): ``["hidden_size 128 (this run: 64)", ...]``; empty when the weights fit."""
    keys = list(_SHAPE_KEYS)
    if "intermediate_size" in saved and "intermediate_size" in current:
        keys.append("intermediate_size")
    else:
        keys += ["mlp_ratio", "multiple_of"]
    return [
        f"{key} {saved[key]} (this run: {current[key]})"
        for key in keys
        if key in saved and key in current and saved[key] != current[key]
    ]


def _existing_ancestor(path: str) -> str:
    """``path`` or its nearest ancestor that exists."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_writable(folder: str, key: str, file: str) -> str:
    """Raise ConfigError unless files can be created in ``folder`` (or, when it does not exist yet, in its nearest
    existing ancestor, where it would be created); returns that existing folder. Nothing is left behind."""
    base = _existing_ancestor(folder)
    if not os.path.isdir(base):
        raise ConfigError(key, f"{folder} cannot be created: {base} is a file, not a folder; choose another path", file)
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=base)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise ConfigError(
            key,
            f"{folder} is not writable ({exc.strerror or exc} in {base}); fix its permissions or choose another folder",
            file,
        ) from None
    return base


def check_checkpoints(config: RunConfig, warn: Callable[[str], None], loads_initial: bool) -> None:
    """The checkpoint folder (see the module docstring); ``loads_initial``: ckpt.load_ckpt_folder will be loaded."""
    ckpt, file = config.ckpt, config.file
    root = ckpt.save_ckpt_folder
    current = config.model_config.to_dict()
    for path, held in partial_saves(root):  # a save cut short (killed, or failed without cleaning up)
        if ckpt.enable_save_ckpt:  # the next save would remove it anyway: give its space back before counting
            shutil.rmtree(path, ignore_errors=True)
        done = "removed" if ckpt.enable_save_ckpt else "kept (ckpt.enable_save_ckpt is off): delete it to free that"
        warn(f"{path} is a checkpoint save that did not complete ({format_bytes(held)}); {done}")
    if ckpt.enable_save_ckpt:
        base = check_writable(root, "ckpt.save_ckpt_folder", file)
        need = checkpoint_bytes(config.model_config)["total"]
        free = shutil.disk_usage(base).free
        if free < need:
            raise ConfigError(
                "ckpt.save_ckpt_folder",
                f"{root} has {format_bytes(free)} free but one checkpoint of this model takes about "
                f"{format_bytes(need)} (weights + fp32 optimizer state); free space or save to a larger disk",
                file,
            )
        if ckpt.keep_last > 1 and free < need * (ckpt.keep_last + 1):
            warn(
                f"{root} has room for {int(free // need)} checkpoint(s) of about {format_bytes(need)}; ckpt.keep_last="
                f"{ckpt.keep_last} keeps {ckpt.keep_last} (+1 while saving): the disk may fill up"
            )
    for path, names in metaless_folders(root).items():
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise CheckpointError(
            f"checkpoint folder {path} holds files ({shown}) but no {META_FILE}: it is not a complete checkpoint (a "
            f"copy cut short, or {META_FILE} deleted?) and a save of that step would replace it; restore its "
            f"{META_FILE}, or move the folder out of {root}"
        )
    if ckpt.auto_resume:
        damaged = []
        for step in reversed(complete_checkpoints(root)):
            path = os.path.join(root, str(step))
            problems = checkpoint_problems(path, quick=True)
            if problems:
                damaged.append(f"{path}: {'; '.join(problems)}")
                continue
            meta = read_meta(path)
            _check_model(path, meta, current, "this run's checkpoint folder")
            _check_dtype(path, meta, current, file)
            check_checkpoint_files(path, meta.get("files") or os.listdir(path))  # no pickle that runs code
            break
        else:
            if damaged:
                raise CheckpointError(
                    f"no usable checkpoint in {root}: every complete checkpoint is damaged ({' | '.join(damaged)}); "
                    f"restore the files, or move the folders out of {root} to start from scratch"
                )
    if loads_initial:
        _check_initial_weights(ckpt.load_ckpt_folder, current, file)


def _check_model(path: str, meta: Any, current: dict, what: str) -> None:
    saved = meta.get("model_config") if isinstance(meta, dict) else None
    differences = model_difference(saved, current) if isinstance(saved, dict) else []
    if differences:
        raise CheckpointError(
            f"checkpoint {path} ({what}) holds another model: {', '.join(differences)}; set the model keys back to "
            f"the checkpoint's, or give the new model its own work_dir / ckpt.save_ckpt_folder"
        )


def _check_dtype(path: str, meta: Any, current: dict, file: str) -> None:
    """Resuming needs the checkpoint's model.dtype: its optimizer shards hold flat buffers of that dtype (the
    weights alone convert: ckpt.load_ckpt_folder casts them)."""
    saved = meta.get("model_config", {}).get("dtype") if isinstance(meta, dict) else None
    if saved is not None and saved != current.get("dtype"):
        raise ConfigError(
            "model.dtype",
            f"{current.get('dtype')} differs from {saved}, the dtype of checkpoint {path} this run would resume "
            f"(its optimizer state is laid out for it); set model.dtype='{saved}' to resume, or to change the dtype "
            f"start a new work_dir from its weights with ckpt.load_ckpt_folder={path} (fresh optimizer state)",
            file,
        )


def _check_initial_weights(path: str, current: dict, file: str) -> None:
    """ckpt.load_ckpt_folder: a folder; with a meta.json, its model files match their sizes and CRC-32 and its
    model is this run's (a folder without meta.json is read as it is)."""
    if not os.path.isdir(path):
        raise ConfigError("ckpt.load_ckpt_folder", f"{path} is not a folder; point it at a checkpoint folder", file)
    if not os.path.isfile(os.path.join(path, META_FILE)):
        return
    try:
        meta = read_meta(path)
        names = [n for n in meta.get("files") or {} if n.startswith("model_")]
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} (ckpt.load_ckpt_folder): {META_FILE} cannot be read ({exc})"
        ) from None
    problems = checkpoint_problems(path, names) if names else []
    if problems:
        raise CheckpointError(
            f"checkpoint {path} (ckpt.load_ckpt_folder) is damaged: {'; '.join(problems)}; restore it or point "
            f"ckpt.load_ckpt_folder at another checkpoint"
        )
    _check_model(path, meta, current, "ckpt.load_ckpt_folder")
    check_checkpoint_files(path, [n for n in os.listdir(path) if n.startswith("model_")])


def check_data(phase: Phase) -> None:
    """Build the phase's training loader and validation batches as rank 0 would (every shard's meta is read and
    checked, the validation windows' token ids too), and check that the shards' recorded vocabulary fits
    model.vocab_size. Training windows' token ids are checked as the trainer reads them (`check_window_ids`):
    a start-up scan would read the whole corpus on every rank at every start."""
    from internlm.data import DataError, build_train_loader, build_valid_batches
    from internlm.data.sources import TokenIdError

    config = phase.config
    data, file = config.data, config.file
    key = "data.train_folder"
    vocab = config.model_config.vocab_size
    try:
        loader = build_train_loader(data, config.seed, 0, phase.layout.data)  # meta read once: the trainer reuses it
        streams = [source.stream for source in loader.sources.values() if hasattr(source, "stream")]
        if data.valid_folder is not None:
            from internlm.data.loader import parse_weights
            from internlm.data.train_sources import open_stream

            key = "data.valid_folder"
            streams += [open_stream(k) for k in sorted(parse_weights(data.valid_folder))]
    except (DataError, ValueError, OSError) as exc:
        raise ConfigError(key, str(exc), file) from None
    for stream in streams:  # the recorded vocabulary first: it names the cause better than a token id would
        recorded = getattr(stream, "vocab_size", None)
        if recorded is not None and int(recorded) > vocab:
            raise ConfigError(
                "model.vocab_size",
                f"{vocab} is smaller than the vocabulary of the shards in {stream.folder} ({recorded}, recorded in "
                f"their .bin.meta): token ids up to {int(recorded) - 1} would index past the embedding; set "
                f"model.vocab_size >= {recorded} or re-tokenize with a smaller tokenizer",
                file,
            )
    key = "data.valid_folder" if data.valid_folder is not None else "data.valid_ratio"
    try:
        build_valid_batches(data, config.seed, 0, phase.layout.data, vocab_size=vocab)
    except TokenIdError as exc:
        raise ConfigError("model.vocab_size", exc.problem, file) from None
    except (DataError, ValueError, OSError) as exc:
        raise ConfigError(key, str(exc), file) from None


def check_tokenizer(config: RunConfig) -> None:
    """data.tokenizer_path, when set: a SentencePiece model whose vocabulary fits model.vocab_size."""
    from internlm.data import DataError, Tokenizer

    path = config.data.tokenizer_path
    if not path:
        return
    try:
        tokenizer = Tokenizer(path)
    except DataError as exc:
        raise ConfigError("data.tokenizer_path", str(exc), config.file) from None
    if tokenizer.vocab_size > config.model_config.vocab_size:
        raise ConfigError(
            "data.tokenizer_path",
            f"{path} has {tokenizer.vocab_size} pieces, more than model.vocab_size={config.model_config.vocab_size}; "
            f"raise model.vocab_size or use the tokenizer the data was made with",
            config.file,
        )


def startup_checks(phases: List[Phase], warn: Callable[[str], None]) -> None:
    """Every start-up check of a run (see the module docstring); raises ConfigError or `BadInputError`."""
    first = phases[0].config
    has_checkpoint = bool(complete_checkpoints(first.ckpt.save_ckpt_folder)) and first.ckpt.auto_resume
    initial = check_start_plan(first.ckpt, has_checkpoint, first.file, first.model_config)  # load_ckpt_info
    loads_initial = bool(first.ckpt.load_ckpt_folder) and initial.weights_from == first.ckpt.load_ckpt_folder
    check_checkpoints(first, warn, loads_initial=loads_initial)
    for phase in phases:
        check_data(phase)
    seen = set()
    for phase in phases:
        if phase.config.data.tokenizer_path not in seen:
            seen.add(phase.config.data.tokenizer_path)
            check_tokenizer(phase.config)


def start_up(phases: List[Phase], rank: int) -> Optional[WorkDirLock]:
    """Rank 0 takes the work_dir lock and runs `startup_checks`; every rank then learns the verdict (a broadcast
    from rank 0 when a process group is initialised). Returns rank 0's held lock (None on other ranks; release
    it on every exit). Raises `BadInputError` with rank 0's one-line message on every rank when a check failed
    (the lock is released)."""
    import torch.distributed as dist

    from internlm.data import DataError

    lock, error = None, None
    if rank == 0:
        warn = lambda text: print(f"warning: {text}", flush=True)  # noqa: E731
        try:
            lock = WorkDirLock(phases[0].config.work_dir)
            note = lock.acquire()
            if note:
                warn(note)
            startup_checks(phases, warn)
        except (ConfigError, BadInputError, DataError) as exc:
            error = str(exc)
    if dist.is_available() and dist.is_initialized():
        verdict = [error]
        dist.broadcast_object_list(verdict, src=0)
        error = verdict[0]
    if error is not None:
        if lock is not None:
            lock.release()
        raise BadInputError(error)
    return lock


__all__ = [
    "check_checkpoints",
    "metaless_folders",
    "model_difference",
    "check_data",
    "check_tokenizer",
    "check_writable",
    "start_up",
    "startup_checks",
]
