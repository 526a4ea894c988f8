"""The ``parallel`` section: tensor, pipeline, context and ZeRO-1 sizes (an int stands for ``dict(size=int)``).

Sizes are checked against the world size at launch (`internlm.parallel.layout.Layout.problems`), not here.
"""

import dataclasses
from typing import Annotated, Union

from .. import compat
from ..keys import EQUIVALENT, FIXED, key, section


@section("parallel.tensor", shorthand="size")
@dataclasses.dataclass(frozen=True)
class TensorSection:
    """tensor parallelism; an int means dict(size=int)"""

    size: Annotated[int, key(1, "tensor-parallel group size", minimum=1)]
    mode: Annotated[str, key("mtp", "tensor-parallel mode; only 'mtp' (Megatron style)", choices=("mtp",))]
    sp: Annotated[
        str,
        key(
            "none",
            "InternLM's sequence-parallel mode: 'none', or 'megatron' (sets parallel.sequence_parallel=True, "
            "the Megatron style implemented here); 'flash-attn', 'intern' and 'flash' are rejected",
            compat=EQUIVALENT,
            normalize=compat.tensor_sp,
        ),
    ]
    intern_overlap: Annotated[
        bool,
        key(
            False,
            "InternLM compatibility; any value: it only tunes InternLM's 'intern' sp mode, which is rejected",
            compat=EQUIVALENT,
        ),
    ]


@section("parallel.pipeline", shorthand="size")
@dataclasses.dataclass(frozen=True)
class PipelineSection:
    """pipeline parallelism; an int means dict(size=int)"""

    size: Annotated[int, key(1, "pipeline stages", minimum=1)]
    interleaved_overlap: Annotated[bool, key(False, "overlap p2p communication in the interleaved schedule")]


@section("parallel.zero1", shorthand="size")
@dataclasses.dataclass(frozen=True)
class Zero1Section:
    """ZeRO-1 optimizer-state sharding; an int means dict(size=int)"""

    size: Annotated[
        int, key(-1, "optimizer-state shard group size; <=0: the whole data-parallel group, 1: no sharding")
    ]
    fsdp: Annotated[bool, key(False, "InternLM's FSDP mode; only False", compat=FIXED)]


@section("parallel")
@dataclasses.dataclass(frozen=True)
class ParallelSection:
    """Parallel layout. Sizes are checked against the world size at launch, not here."""

    tensor: TensorSection
    pipeline: PipelineSection
    zero1: Zero1Section
    sequence_parallel: Annotated[bool, key(False, "shard activations along the sequence in tensor-parallel regions")]
    context: Annotated[
        int,
        key(
            1,
            "context-parallel group size: each sequence is split over this many ranks from embedding to loss "
            "(docs/context_parallel.md)",
            minimum=1,
        ),
    ]
    context_mode: Annotated[
        str,
        key(
            "ring",
            "context-parallel attention: 'ring' (K/V blocks passed around the group, zigzag-balanced; seq_len "
            "divisible by 2 * context) or 'a2a' (all-to-all from sequence to heads; heads divisible by context)",
            choices=("ring", "a2a"),
        ),
    ]
    timeout_minutes: Annotated[
        Union[int, float],
        key(
            30,
            "timeout of every collective of the process groups (torch.distributed init_process_group and new_group) "
            "and of checkpoint saves; raise it when a start-up or save outlasts it",
            minimum=1,
        ),
    ]


__all__ = ["ParallelSection", "TensorSection", "PipelineSection", "Zero1Section"]
