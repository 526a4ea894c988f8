"""Every config key: its type, default and meaning, in one place.

The same tables drive validation (`internlm.config.resolve`) and the key reference in docs/config.md
(`internlm.config.docs`), so the documentation cannot drift from what the loader accepts. Key names and
meanings follow InternLM's configs (e.g. configs/7B_sft.py); keys this framework adds are listed in the
"Differences from InternLM" section of docs/config.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Tuple, Union

import torch

from internlm.model.config import normalize_rope_scaling, parse_dtype

from . import compat as _compat
from .step_ranges import canonical_step_ranges

NoneType = type(None)

# InternLM compatibility modes of a key
IGNORED = "ignored"  # accepted with any value of the right type, has no effect
FIXED = "fixed"  # accepted only at InternLM's default value
# accepted where the value means what this framework does (the doc says why), any other value is rejected with
# what to use instead (the field's normalize, or internlm.config.compat.check_compat); docs/internlm_compat.md
EQUIVALENT = "equivalent"


@dataclass(frozen=True)
class Field:
    """One leaf key.

    ``types``: accepted Python types (an int is also accepted where float is, a bool never where int is).
    A ``dict`` among them means a free-form dict whose contents are not key-checked.
    ``normalize`` maps an accepted value to its canonical form, raising ValueError with the problem.
    """

    types: Tuple[type, ...]
    default: Any
    doc: str
    choices: Optional[Tuple[Any, ...]] = None
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    compat: Optional[str] = None
    normalize: Optional[Callable[[Any], Any]] = None
    default_text: Optional[str] = None  # how the default is shown in the docs, when repr is unreadable


@dataclass(frozen=True)
class Section:
    """A dict of keys. With ``shorthand``, a bare value stands for ``{shorthand: value}`` (InternLM's
    ``tensor=8`` for ``tensor=dict(size=8, mode="mtp")``)."""

    fields: Mapping[str, Union[Field, "Section"]]
    doc: str
    shorthand: Optional[str] = None


def _canonical_dtype(value: Any) -> str:
    return str(parse_dtype(value))  # "bf16", "bfloat16", torch.bfloat16 -> "torch.bfloat16"


SELECTIVE_CHECKPOINT = ("attn", "mlp")


def _checkpoint_mode(value: Any) -> Any:
    # True/False, a fraction of layers (range-checked by minimum/maximum), or a selective mode
    if isinstance(value, str):
        mode = value.strip().lower()
        if mode not in SELECTIVE_CHECKPOINT:
            raise ValueError(f"{value!r} is not a checkpoint mode; use True, False, a fraction, 'attn' or 'mlp'")
        return mode
    return value


def _whole_tokens(value: Any) -> Optional[int]:
    # token budgets are often written 2e9; accept whole floats, keep an int
    if value is None or isinstance(value, int):
        return value
    if not float(value).is_integer():
        raise ValueError(f"must be a whole number of tokens, got {value!r}")
    return int(value)


def _local_folder(value: Any) -> Any:
    # InternLM spells local paths "local:path"; object stores (boto3:, volc:, oss2:) are not supported
    if not isinstance(value, str) or ":" not in value.split("/")[0]:
        return value
    scheme, _, path = value.partition(":")
    if scheme == "local":
        return path
    raise ValueError(f"storage scheme {scheme!r} is not supported; use a local path (optionally 'local:path')")


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


_OPT_STR = (str, NoneType)
_OPT_INT = (int, NoneType)

MODEL = Section(
    doc="Model shape and numerics (InternLMConfig).",
    fields={
        "preset": Field(_OPT_STR, None, "name from internlm.model.PRESETS; fills the shape keys not given explicitly"),
        "checkpoint": Field(
            (bool, float, str),
            False,
            "activation checkpointing: True/False, the fraction of layers recomputed (the first ones of every "
            "model chunk), or a selective mode for every layer: 'attn' (recompute attention's core only) or "
            "'mlp' (recompute the MLP only)",
            minimum=0,
            maximum=1,
            normalize=_checkpoint_mode,
        ),
        "compile": Field(
            (bool,),
            False,
            "compile every decoder layer with torch.compile (inductor; the attention core stays eager)",
        ),
        "fused_loss": Field(
            (bool,),
            True,
            "output head + cross-entropy fused and chunked over tokens on the last pipeline stage (the full logits "
            "are never materialised); False: lm_head logits, then the (vocab-parallel) cross-entropy",
        ),
        "num_attention_heads": Field((int,), 32, "attention (query) heads", minimum=1),
        "num_kv_attention_heads": Field(
            _OPT_INT,
            None,
            "key/value heads for grouped-query attention; None resolves to num_attention_heads",
            minimum=1,
        ),
        "hidden_size": Field((int,), 4096, "model width", minimum=1),
        "num_layers": Field((int,), 32, "decoder layers", minimum=1),
        "mlp_ratio": Field(
            (float,),
            8 / 3,
            "MLP width / hidden_size before rounding up to multiple_of",
            minimum=0,
            default_text="8 / 3",
        ),
        "multiple_of": Field((int,), 256, "MLP width is rounded up to a multiple of this", minimum=1),
        "intermediate_size": Field(
            _OPT_INT,
            None,
            "MLP width given directly; None: mlp_ratio * hidden_size rounded up to multiple_of",
            minimum=1,
        ),
        "vocab_size": Field((int,), 103168, "vocabulary size (embedding and output head rows)", minimum=1),
        "dtype": Field(
            (str, torch.dtype),
            "torch.bfloat16",
            "parameter and compute dtype: torch.float32, torch.bfloat16 or torch.float16",
            normalize=_canonical_dtype,
        ),
        "norm_type": Field((str,), "rmsnorm", "normalisation layer", choices=("rmsnorm",)),
        "layer_norm_epsilon": Field((float,), 1e-6, "RMSNorm epsilon", minimum=0),
        "rope_base": Field((float,), 10000.0, "rotary embedding base", minimum=0),
        "rope_scaling": Field(
            (dict, NoneType),
            None,
            "rotary scaling as in Hugging Face configs: None, {'type': 'dynamic', 'factor': F} (NTK: beyond "
            "max_position_embeddings M a forward of longest sequence L uses base * (F * L / M - (F - 1)) ** "
            "(D / (D - 2))) or {'type': 'linear', 'factor': F} (positions / F); the 7B and 20B presets: dynamic, 1.0",
            normalize=normalize_rope_scaling,
        ),
        "max_position_embeddings": Field(
            _OPT_INT,
            None,
            "longest sequence the model is built for; None resolves to the preset's value, else data.seq_len",
            minimum=1,
        ),
        "use_flash_attn": Field((bool,), True, "InternLM's switch; False with attn_backend='auto' selects sdpa"),
        "attn_backend": Field(
            (str,),
            "auto",
            "attention kernel: auto (flash if installed, else sdpa), flash, sdpa or reference",
            choices=("auto", "flash", "sdpa", "reference"),
        ),
        "init_std": Field((float,), 0.02, "standard deviation of the normal weight initialisation", minimum=0),
        "qkvo_bias": Field((bool,), True, "bias on the q, k, v and o projections (InternLM-7B has them)"),
        "num_chunks": Field(
            (int,),
            1,
            "model chunks (virtual pipeline stages) per pipeline rank; >1 selects the interleaved schedule",
            minimum=1,
        ),
        "embed_split_hidden": Field((bool,), True, "InternLM compatibility; only True", compat=FIXED),
        "embed_grad_scale": Field((float,), 1.0, "InternLM compatibility; only 1", compat=FIXED),
        "parallel_output": Field(
            (bool,), True, "InternLM compatibility; only True (logits stay vocab-parallel into the loss)", compat=FIXED
        ),
        "apply_post_layer_norm": Field((bool,), False, "InternLM compatibility; only False (pre-norm)", compat=FIXED),
    },
)

DATA = Section(
    doc="Batch shape, run length and data sources.",
    fields={
        "seq_len": Field((int,), 2048, "tokens per packed sequence", minimum=1),
        "micro_num": Field((int,), 1, "micro-batches per optimizer step (gradient accumulation)", minimum=1),
        "micro_bsz": Field((int,), 1, "packed sequences per micro-batch", minimum=1),
        "valid_micro_num": Field((int,), 4, "micro-batches per validation run", minimum=1),
        "valid_every": Field((int,), 0, "validate every this many steps; 0: only at the end", minimum=0),
        "valid_ratio": Field(
            (float,),
            0.02,
            "fraction of train_folder held out for validation when valid_folder is None",
            minimum=0,
            maximum=1,
        ),
        "valid_max_samples": Field((int,), 64, "cap on held-out validation sequences", minimum=1),
        "total_steps": Field(_OPT_INT, None, "optimizer steps of this phase", minimum=1),
        "total_tokens": Field(
            (int, float, NoneType),
            None,
            "token budget of this phase; steps = ceil(total_tokens / (global batch sequences * seq_len))",
            minimum=1,
            normalize=_whole_tokens,
        ),
        "train_folder": Field(
            (str, dict, NoneType), None, "tokenized data folder, or a mixture dict {folder: weight}", normalize=_mixture
        ),
        "block_seqs": Field(
            (int,),
            1024,
            "sequences per shuffle block of a source; a seq_len change between "
            "phases skips at most the rest of one block",
            minimum=1,
        ),
        "valid_folder": Field(
            _OPT_STR, None, "tokenized validation folder; None holds out valid_ratio of the training data"
        ),
        "tokenizer_path": Field(_OPT_STR, None, "SentencePiece model file (used for demo data and sampling)"),
        "prepare_demo_data": Field(
            (bool,), False, "build the demo corpus and tokenizer into demo_cache_dir and train on it"
        ),
        "demo_cache_dir": Field((str,), "data_cache/demo", "where the demo corpus and tokenizer are built"),
        "pack_sample_into_one": Field(
            (bool,),
            False,
            "InternLM compatibility; only False, what this framework does: documents are packed with their "
            "boundaries kept (attention and positions restart at each document)",
            compat=EQUIVALENT,
            normalize=_compat.pack_sample_into_one,
        ),
        "skip_batches": Field(
            (str,),
            "",
            "global steps whose batches are drawn and dropped, not trained on (InternLM's key and syntax): "
            "'5-10,20' skips steps 5 to 10 and 20, numbered as in metrics.jsonl (from 1); merged with the steps a "
            "checkpoint records (health.rollback), so a resume keeps skipping them",
            normalize=canonical_step_ranges,
        ),
        "rampup_batch_size": Field(
            (str,),
            "",
            "InternLM compatibility; only '' (no batch-size ramp-up: one phase config per batch size)",
            compat=EQUIVALENT,
            normalize=_compat.rampup_batch_size,
        ),
        "min_length": Field(
            (int,),
            0,
            "InternLM compatibility; only 0 (no document is dropped at training time; "
            "tools/convert_internlm_data.py --min-length drops short documents when converting)",
            minimum=0,
            compat=EQUIVALENT,
            normalize=_compat.min_length,
        ),
        "empty_cache_and_diag_interval": Field(
            (int,),
            10,
            "InternLM compatibility; any value: in InternLM it only schedules CUDA cache release and slow-device "
            "diagnostics, which change nothing that is trained (step times are in metrics.jsonl)",
            compat=EQUIVALENT,
        ),
        "diag_outlier_ratio": Field(
            (float,),
            1.1,
            "InternLM compatibility; any value: the threshold of InternLM's slow-device diagnostics (see "
            "empty_cache_and_diag_interval), no effect on training",
            compat=EQUIVALENT,
        ),
        "num_worker": Field(
            (int,),
            4,
            "InternLM compatibility; any value: the number of loader worker processes never changes which batches "
            "are trained, and memory-mapped shards are read in the training process",
            minimum=0,
            compat=EQUIVALENT,
        ),
        "type": Field(
            (str,),
            "tokenized",
            "InternLM compatibility; only 'tokenized' (pre-tokenized shards, what this framework reads)",
            compat=EQUIVALENT,
            normalize=_compat.data_type,
        ),
    },
)

PARALLEL = Section(
    doc="Parallel layout. Sizes are checked against the world size at launch, not here.",
    fields={
        "tensor": Section(
            doc="tensor parallelism; an int means dict(size=int)",
            shorthand="size",
            fields={
                "size": Field((int,), 1, "tensor-parallel group size", minimum=1),
                "mode": Field((str,), "mtp", "tensor-parallel mode; only 'mtp' (Megatron style)", choices=("mtp",)),
                "sp": Field(
                    (str,),
                    "none",
                    "InternLM's sequence-parallel mode: 'none', or 'megatron' (sets parallel.sequence_parallel=True, "
                    "the Megatron style implemented here); 'flash-attn', 'intern' and 'flash' are rejected",
                    compat=EQUIVALENT,
                    normalize=_compat.tensor_sp,
                ),
                "intern_overlap": Field(
                    (bool,),
                    False,
                    "InternLM compatibility; any value: it only tunes InternLM's 'intern' sp mode, which is rejected",
                    compat=EQUIVALENT,
                ),
            },
        ),
        "pipeline": Section(
            doc="pipeline parallelism; an int means dict(size=int)",
            shorthand="size",
            fields={
                "size": Field((int,), 1, "pipeline stages", minimum=1),
                "interleaved_overlap": Field((bool,), False, "overlap p2p communication in the interleaved schedule"),
            },
        ),
        "zero1": Section(
            doc="ZeRO-1 optimizer-state sharding; an int means dict(size=int)",
            shorthand="size",
            fields={
                "size": Field(
                    (int,), -1, "optimizer-state shard group size; <=0: the whole data-parallel group, 1: no sharding"
                ),
                "fsdp": Field((bool,), False, "InternLM's FSDP mode; only False", compat=FIXED),
            },
        ),
        "sequence_parallel": Field((bool,), False, "shard activations along the sequence in tensor-parallel regions"),
        "timeout_minutes": Field(
            (int, float),
            30,
            "timeout of every collective of the process groups (torch.distributed init_process_group and new_group) "
            "and of checkpoint saves; raise it when a start-up or save outlasts it",
            minimum=1,
        ),
    },
)

ADAM = Section(
    doc="AdamW hyper-parameters.",
    fields={
        "lr": Field((float,), 1e-4, "peak learning rate", minimum=0),
        "adam_beta1": Field((float,), 0.9, "beta1", minimum=0, maximum=1),
        "adam_beta2": Field((float,), 0.95, "beta2 (initial value of the beta2 schedule)", minimum=0, maximum=1),
        "adam_beta2_c": Field((float,), 0.0, "beta2 schedule coefficient; 0 keeps beta2 constant", minimum=0),
        "adam_eps": Field((float,), 1e-8, "epsilon", minimum=0),
        "weight_decay": Field((float,), 0.01, "decoupled weight decay", minimum=0),
    },
)

LR_SCHEDULER = Section(
    doc="Linear warmup then cosine decay to eta_min.",
    fields={
        "total_steps": Field(
            _OPT_INT,
            None,
            "schedule length; None resolves to data.total_steps (or the "
            "steps the trainer derives from data.total_tokens)",
            minimum=1,
        ),
        "init_steps": Field((int,), 0, "steps already taken before this schedule starts", minimum=0),
        "warmup_ratio": Field((float,), 0.01, "fraction of total_steps spent warming up", minimum=0, maximum=1),
        "eta_min": Field((float,), 1e-5, "final learning rate; must not exceed adam.lr", minimum=0),
        "last_epoch": Field((int,), -1, "scheduler position to start from; -1: the beginning", minimum=-1),
    },
)

BETA2_SCHEDULER = Section(
    doc="Schedule of Adam's beta2 (InternLM's Beta2Scheduler); constant when c = 0.",
    fields={
        "init_beta2": Field((float, NoneType), None, "None resolves to adam.adam_beta2", minimum=0, maximum=1),
        "c": Field((float, NoneType), None, "None resolves to adam.adam_beta2_c", minimum=0),
        "cur_iter": Field((int,), -1, "schedule position to start from; -1: the beginning", minimum=-1),
    },
)

HYBRID_ZERO_OPTIMIZER = Section(
    doc="ZeRO optimizer communication and clipping.",
    fields={
        "overlap_sync_grad": Field((bool,), True, "reduce gradient buckets while backward still runs"),
        "overlap_sync_param": Field((bool,), True, "broadcast updated parameter shards asynchronously"),
        "reduce_bucket_size": Field(
            (int,),
            512 * 1024 * 1024,
            "gradient reduction bucket size in elements",
            minimum=1,
            default_text="512 * 1024 * 1024",
        ),
        "clip_grad_norm": Field((float,), 1.0, "global gradient norm clip; 0 disables clipping", minimum=0),
    },
)

GRAD_SCALER = Section(
    doc="Dynamic loss scaling, used only when model.dtype is torch.float16.",
    fields={
        "fp16": Section(
            doc="loss scale range",
            fields={
                "initial_scale": Field((float,), 2.0**16, "starting loss scale", minimum=0, default_text="2**16"),
                "min_scale": Field((float,), 1.0, "smallest loss scale", minimum=0),
                "growth_interval": Field((int,), 1000, "overflow-free steps before the scale grows", minimum=1),
            },
        ),
        "growth_factor": Field((float,), 2.0, "scale multiplier after growth_interval clean steps", minimum=1),
        "backoff_factor": Field((float,), 0.5, "scale multiplier after an overflow", minimum=0, maximum=1),
        "max_scale": Field((float,), 2.0**24, "largest loss scale", minimum=0, default_text="2**24"),
        "hysteresis": Field((int,), 2, "overflows tolerated before backing off", minimum=1),
    },
)

LOSS = Section(
    doc="Training loss.",
    fields={"label_smoothing": Field((float,), 0.0, "label smoothing of the cross-entropy", minimum=0, maximum=1)},
)

CKPT = Section(
    doc="Checkpoints: saving, resuming and initial weights.",
    fields={
        "enable_save_ckpt": Field((bool,), True, "save checkpoints"),
        "save_ckpt_folder": Field(
            _OPT_STR,
            None,
            "checkpoint folder; None resolves to {work_dir}/checkpoints; a 'local:' prefix is dropped",
            normalize=_local_folder,
        ),
        "load_ckpt_folder": Field(
            _OPT_STR,
            None,
            "checkpoint to take the initial model weights from (not the optimizer) when no checkpoint is resumed; "
            "'local:' prefix dropped; not used when load_ckpt_info is set (InternLM's precedence)",
            normalize=_local_folder,
        ),
        "auto_resume": Field((bool,), True, "resume from the latest checkpoint in save_ckpt_folder"),
        "checkpoint_every": Field((int,), 50, "save every this many steps (and at the end)", minimum=1),
        "keep_last": Field((int,), 3, "most recent checkpoints kept on disk; 0 keeps all", minimum=0),
        "async_save": Field(
            (bool,),
            False,
            "write checkpoint files from a CPU copy in a background thread while training goes on; a checkpoint "
            "counts once complete, at the next save, the end of training or a stop (docs/checkpoint.md)",
        ),
        "async_upload": Field(
            (bool,),
            False,
            "InternLM compatibility; only False (no object-store upload; ckpt.async_save writes in the background)",
            compat=EQUIVALENT,
            normalize=_compat.async_upload,
        ),
        "async_upload_tmp_folder": Field(
            _OPT_STR,
            None,
            "InternLM compatibility; any value: InternLM uses it only with async_upload=True, which is rejected",
            compat=EQUIVALENT,
        ),
        "oss_snapshot_freq": Field(
            (int, float, NoneType),
            None,
            "InternLM compatibility: None, <= 1 (InternLM's off) or a multiple of checkpoint_every (those snapshot "
            "steps are normal checkpoints in InternLM too); other values are rejected: use checkpoint_every",
            compat=EQUIVALENT,
        ),
        "load_ckpt_info": Field(
            (dict, NoneType),
            None,
            "InternLM's dict(path=..., content=('model',) | ('model', 'optimizer', 'scheduler', 'sampler') | "
            "('all',), ckpt_type='internlm' | 'hf'): the checkpoint (or Hugging Face folder) a run starts from; as in "
            "InternLM it is used only with ckpt.auto_resume=False (docs/checkpoint.md)",
            normalize=_compat.load_ckpt_info,
        ),
        "stop_file_path": Field(
            _OPT_STR,
            None,
            "when this file appears, save and stop after the step it names "
            "(at once if it is empty); the file is then removed",
        ),
        "snapshot_ckpt_folder": Field(
            _OPT_STR,
            None,
            "InternLM compatibility; any value: used only by snapshot checkpoints (see oss_snapshot_freq)",
            compat=EQUIVALENT,
        ),
    },
)

MONITOR = Section(
    doc="Logging.",
    fields={
        "tensorboard": Field((bool,), True, "write TensorBoard scalars under {work_dir}/tensorboard"),
        "log_every": Field(
            (int,),
            1,
            "read the step metrics back from the device every this many steps (the one host sync of the step "
            "loop), then write every step's metrics.jsonl line and TensorBoard scalars (with the peak memory since "
            "the previous read) and refresh the progress bar, or print a plain step line when stdout is not a "
            "terminal; the stop request (ckpt.stop_file_path, SIGTERM) is agreed on at these steps too, and training "
            "health (the health section) is decided there",
            minimum=1,
        ),
        "peak_tflops": Field(
            (float, NoneType),
            None,
            "peak TFLOP/s of one device, the denominator of MFU; None: known GPUs' dense bf16 figure, measured on CPU",
            minimum=0,
        ),
        "alert": Field(
            (dict,),
            {},
            "InternLM compatibility (Feishu alerts): accepted with no address set (enable_feishu_alert False or "
            "feishu_alert_address None, light_monitor_address None); a webhook or heartbeat address is rejected",
            compat=EQUIVALENT,
            normalize=_compat.alert,
        ),
    },
)

PROFILE = Section(
    doc="torch.profiler traces of a few steps (Chrome trace JSON, for Perfetto or TensorBoard), written under "
    "{work_dir}/profile; see README.md.",
    fields={
        "start_step": Field(_OPT_INT, None, "first global step to profile; None: profiling is off", minimum=1),
        "end_step": Field(_OPT_INT, None, "last global step to profile; None: start_step", minimum=1),
        "memory": Field(
            (bool,),
            False,
            "also record memory: allocations in the trace and, on CUDA, a memory snapshot "
            "(torch.cuda.memory._dump_snapshot, viewable at pytorch.org/memory_viz)",
        ),
    },
)

HEALTH = Section(
    doc="Training health, decided where the step metrics are read back (every monitor.log_every steps; with "
    "log_every=1 at every step). A step whose loss or gradient norm is not finite is skipped (no parameter or "
    "optimizer change; an fp16 overflow the loss scaler absorbs is routine and not counted here); while the last "
    "step read back was skipped no checkpoint is saved. See docs/troubleshooting.md.",
    fields={
        "max_skipped_steps": Field(
            (int,),
            3,
            "stop the run (exit code 3) when this many steps in a row were skipped on a non-finite loss or gradient "
            "norm; 0: never stop",
            minimum=0,
        ),
        "spike_factor": Field(
            (float,),
            2.0,
            "a loss above spike_factor * (mean of the previous spike_window losses) is a spike: logged, counted "
            "(metrics loss_spikes); 0: no spike detection",
            minimum=0,
        ),
        "spike_window": Field(
            (int,),
            100,
            "steps in the moving average of the loss (non-skipped, non-spike steps); detection starts once it is full",
            minimum=1,
        ),
        "rollback": Field(
            (bool,),
            False,
            "on a spike, or on max_skipped_steps skipped steps in a row, reload the newest healthy checkpoint before "
            "the offending steps and skip their batches (recorded as data.skip_batches in later checkpoints)",
        ),
    },
)

PHASE = Section(
    doc="Training phase: one config file per phase of a multi-phase run sharing a work_dir.",
    fields={
        "name": Field(_OPT_STR, None, "phase name; None resolves to the config file's stem"),
        "reset_optimizer": Field((bool,), False, "start this phase with fresh optimizer state"),
        "reset_data": Field((bool,), False, "start this phase at the beginning of its data"),
    },
)

ROOT = Section(
    doc="Top-level names of a config file.",
    fields={
        "JOB_NAME": Field((str,), "internlm", "run name"),
        "work_dir": Field(_OPT_STR, None, "output folder; None resolves to work_dirs/{JOB_NAME}"),
        "seed": Field((int,), 1024, "seed of weights initialisation and data order"),
        "model_type": Field((str,), "INTERNLM", "model family; only INTERNLM", choices=("INTERNLM",)),
        "cudnn_deterministic": Field((bool,), False, "torch.backends.cudnn.deterministic"),
        "cudnn_benchmark": Field((bool,), False, "torch.backends.cudnn.benchmark"),
        "model": MODEL,
        "data": DATA,
        "parallel": PARALLEL,
        "adam": ADAM,
        "lr_scheduler": LR_SCHEDULER,
        "beta2_scheduler": BETA2_SCHEDULER,
        "hybrid_zero_optimizer": HYBRID_ZERO_OPTIMIZER,
        "grad_scaler": GRAD_SCALER,
        "loss": LOSS,
        "ckpt": CKPT,
        "monitor": MONITOR,
        "profile": PROFILE,
        "health": HEALTH,
        "phase": PHASE,
    },
)


def iter_fields(section: Section = ROOT, prefix: str = "") -> Iterator[Tuple[str, Union[Field, Section]]]:
    """Yield ``(dotted_path, spec)`` for every key, sections before their contents."""
    for name, spec in section.fields.items():
        path = f"{prefix}{name}"
        yield path, spec
        if isinstance(spec, Section):
            yield from iter_fields(spec, path + ".")


def is_constant(name: str) -> bool:
    """UPPER_CASE top-level names are free constants (kept, not validated) unless the schema names them."""
    return name.isupper() and name not in ROOT.fields


def type_name(types: Tuple[type, ...]) -> str:
    names = {NoneType: "None", dict: "dict", torch.dtype: "torch.dtype"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def lookup(path: str) -> Union[Field, Section, None]:
    """The schema entry at a dotted path, or None when the path is not in the schema."""
    spec: Union[Field, Section, None] = ROOT
    for part in path.split("."):
        if not isinstance(spec, Section) or part not in spec.fields:
            return None
        spec = spec.fields[part]
    return spec
