"""The checkpoint format and everything that reads or writes it.

    files.py     file names, writer ranks, meta.json (its fields are documented there), finding checkpoints,
                 the commit; `write_json`, the one fsync-ing JSON writer
    file_io.py   writing a file while computing its CRC-32, checking files against meta.json, the async writer
    safe_load.py the one torch.load: weights-only unpickling, nothing in a file runs (old RNG files converted)
    reader.py    full tensors of a checkpoint of any layout (the one parser of model files), picking a step
    verify.py    resume verification over the ranks, moving damaged checkpoints aside, fallback
    manager.py   `CheckpointManager`: the collective save (and its commit), prune, same-layout load
    reshard.py   loading under another layout (model and optimizer), full tensors into a rank's shards
    convert.py   a one-process checkpoint of full tensors (what tools/convert_from_hf.py writes)

Only the names of the first three are imported here: they import neither ``internlm.model`` nor
``internlm.parallel``, so the model's ``from_pretrained`` can read checkpoints without an import cycle. The
modules that need a `Layout` or the optimizer (verify, manager, reshard, convert) are imported by their path.
See docs/checkpoint.md.
"""

from .file_io import FileWriter, checkpoint_problems, cpu_snapshot, file_problem, file_record, write_file
from .files import (
    DAMAGED_SUFFIX,
    FORMAT_VERSION,
    META_FILE,
    TMP_PREFIX,
    TRAIN_STATE_FILE,
    accounted_bytes,
    checkpoint_healthy,
    commit_checkpoint,
    complete_checkpoints,
    file_writers,
    files_table,
    is_checkpoint,
    latest_checkpoint,
    model_file,
    model_writer_dp,
    optim_file,
    partial_saves,
    read_meta,
    rewrite_meta,
    rng_file,
    write_json,
    writes_optimizer_file,
)
from .reader import CheckpointReader, find_checkpoint, merge_model_checkpoint, recorded_config_files

__all__ = [
    "DAMAGED_SUFFIX",
    "FORMAT_VERSION",
    "META_FILE",
    "TMP_PREFIX",
    "TRAIN_STATE_FILE",
    "CheckpointReader",
    "accounted_bytes",
    "FileWriter",
    "checkpoint_healthy",
    "checkpoint_problems",
    "commit_checkpoint",
    "complete_checkpoints",
    "cpu_snapshot",
    "file_problem",
    "file_record",
    "file_writers",
    "files_table",
    "find_checkpoint",
    "is_checkpoint",
    "latest_checkpoint",
    "merge_model_checkpoint",
    "model_file",
    "model_writer_dp",
    "optim_file",
    "partial_saves",
    "read_meta",
    "recorded_config_files",
    "rewrite_meta",
    "rng_file",
    "write_file",
    "write_json",
    "writes_optimizer_file",
]
