"""The ``data`` section: batch shape, run length and data sources."""

import dataclasses
from typing import Annotated, Any, Dict, Mapping, Optional, Union

from .. import compat
from ..keys import EQUIVALENT, NoneType, key, section
from ..step_ranges import canonical_step_ranges


def _whole_tokens(value: Any) -> Optional[int]:
    # token budgets are often written 2e9; accept whole floats, keep an int
    if value is None or isinstance(value, int):
        return value
    if not float(value).is_integer():
        raise ValueError(f"must be a whole number of tokens, got {value!r}")
    return int(value)


def _mixture(value: Any) -> Any:
    if isinstance(value, Mapping):
        if not value:
            raise ValueError("a mixture dict needs at least one {path: weight} entry")
        for path, weight in value.items():
            if not isinstance(path, str) or isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ValueError(f"mixture entries must be str path -> number weight, got {path!r}: {weight!r}")
            if weight <= 0:
                raise ValueError(f"mixture weight of {path!r} must be positive, got {weight!r}")
        return {path: float(weight) for path, weight in value.items()}
    return value


@section("data")
@dataclasses.dataclass(frozen=True)
class DataSection:
    """Batch shape, run length and data sources."""

    seq_len: Annotated[int, key(2048, "tokens per packed sequence", minimum=1)]
    micro_num: Annotated[int, key(1, "micro-batches per optimizer step (gradient accumulation)", minimum=1)]
    micro_bsz: Annotated[int, key(1, "packed sequences per micro-batch", minimum=1)]
    valid_micro_num: Annotated[int, key(4, "micro-batches per validation run", minimum=1)]
    valid_every: Annotated[int, key(0, "validate every this many steps; 0: only at the end", minimum=0)]
    valid_ratio: Annotated[
        float,
        key(0.02, "fraction of train_folder held out for validation when valid_folder is None", minimum=0, maximum=1),
    ]
    valid_max_samples: Annotated[int, key(64, "cap on held-out validation sequences", minimum=1)]
    total_steps: Annotated[Optional[int], key(None, "optimizer steps of this phase", minimum=1)]
    total_tokens: Annotated[
        Optional[int],
        key(
            None,
            "token budget of this phase; steps = ceil(total_tokens / (global batch sequences * seq_len))",
            minimum=1,
            normalize=_whole_tokens,
            accepts=(int, float, NoneType),
        ),
    ]
    train_folder: Annotated[
        Union[str, Dict[str, float], None],
        key(None, "tokenized data folder, or a mixture dict {folder: weight}", normalize=_mixture),
    ]
    block_seqs: Annotated[
        int,
        key(
            1024,
            "sequences per shuffle block of a source; a seq_len change between phases skips at most the rest of "
            "one block",
            minimum=1,
        ),
    ]
    valid_folder: Annotated[
        Optional[str], key(None, "tokenized validation folder; None holds out valid_ratio of the training data")
    ]
    tokenizer_path: Annotated[Optional[str], key(None, "SentencePiece model file (used for demo data and sampling)")]
    prepare_demo_data: Annotated[
        bool, key(False, "build the demo corpus and tokenizer into demo_cache_dir and train on it")
    ]
    demo_cache_dir: Annotated[str, key("data_cache/demo", "where the demo corpus and tokenizer are built")]
    pack_sample_into_one: Annotated[
        bool,
        key(
            False,
            "InternLM compatibility; only False, what this framework does: documents are packed with their "
            "boundaries kept (attention and positions restart at each document)",
            compat=EQUIVALENT,
            normalize=compat.pack_sample_into_one,
        ),
    ]
    skip_batches: Annotated[
        str,
        key(
            "",
            "global steps whose batches are drawn and dropped, not trained on (InternLM's key and syntax): "
            "'5-10,20' skips steps 5 to 10 and 20, numbered as in metrics.jsonl (from 1); merged with the steps a "
            "checkpoint records (health.rollback), so a resume keeps skipping them",
            normalize=canonical_step_ranges,
        ),
    ]
    rampup_batch_size: Annotated[
        str,
        key(
            "",
            "InternLM compatibility; only '' (no batch-size ramp-up: one phase config per batch size)",
            compat=EQUIVALENT,
            normalize=compat.rampup_batch_size,
        ),
    ]
    min_length: Annotated[
        int,
        key(
            0,
            "InternLM compatibility; only 0 (no document is dropped at training time; "
            "tools/convert_internlm_data.py --min-length drops short documents when converting)",
            minimum=0,
            compat=EQUIVALENT,
            normalize=compat.min_length,
        ),
    ]
    empty_cache_and_diag_interval: Annotated[
        int,
        key(
            10,
            "InternLM compatibility; any value: in InternLM it only schedules CUDA cache release and slow-device "
            "diagnostics, which change nothing that is trained (step times are in metrics.jsonl)",
            compat=EQUIVALENT,
        ),
    ]
    diag_outlier_ratio: Annotated[
        float,
        key(
            1.1,
            "InternLM compatibility; any value: the threshold of InternLM's slow-device diagnostics (see "
            "empty_cache_and_diag_interval), no effect on training",
            compat=EQUIVALENT,
        ),
    ]
    num_worker: Annotated[
        int,
        key(
            4,
            "InternLM compatibility; any value: the number of loader worker processes never changes which batches "
            "are trained, and memory-mapped shards are read in the training process",
            minimum=0,
            compat=EQUIVALENT,
        ),
    ]
    type: Annotated[
        str,
        key(
            "tokenized",
            "'tokenized': train_folder holds tokenized shards; 'streaming' (InternEvo's key): train_folder holds raw "
            "documents (.txt, .jsonl) tokenized while training with tokenizer_path in background processes, same "
            "batches as tokenizing them first (docs/data.md)",
            compat=EQUIVALENT,
            normalize=compat.data_type,
        ),
    ]
    text_key: Annotated[str, key("text", "data.type='streaming': the field of a jsonl record holding its text")]
    stream_workers: Annotated[
        int,
        key(
            1,
            "data.type='streaming': tokenizer processes per training process (0: tokenize in a background thread); "
            "never changes the batches",
            minimum=0,
        ),
    ]
    accept_changed_data: Annotated[
        bool,
        key(
            False,
            "resume even though a source's files were added, removed or changed since the checkpoint (its position "
            "is mapped to the same token of the same file, docs/data.md); False stops the run with exit 2",
        ),
    ]


__all__ = ["DataSection"]
