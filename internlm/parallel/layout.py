"""`Layout`: the parallel layout of a run, one value built once from the config and the world size.

A layout says how ``world_size`` processes tile the four parallel dimensions and how the optimizer state is
sharded::

    world_size = tensor * context * pipeline * data      zero1 divides data (zero1 = data: plain ZeRO-1)
    rank       = tp_rank + tensor * (cp_rank + context * (dp_rank + data * pp_rank))

Tensor ranks are neighbours (their collectives run in every layer, so a tensor group stays inside a node),
context ranks next (ring sends or all-to-alls of K/V every layer: heavier than the once-a-step gradient
reduction, so a tensor x context block should stay inside a node too), pipeline stages the slowest dimension.
Context ranks hold replicated weights: their gradients are summed with the data-parallel ones over the zero1
replica group, which spans the zero1 blocks of every context rank (docs/context_parallel.md).
Zero1 groups are consecutive blocks of ``zero1`` data-parallel ranks: optimizer states are sharded inside a block,
and blocks hold identical replicas (hybrid ZeRO).

The layout needs no process group: the CLI checks it, ``--dry-run`` plans with it, checkpoints record it
(``to_dict``), resharding compares two of them, and `init_parallel_context` builds the groups it describes.
`problems` (and `fit_problems` for a given model and batch) return structured `Problem` records naming the
config key to change.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Mapping, Tuple

from internlm.problems import Problem

from .pipeline.partition import pipeline_problems


@dataclass(frozen=True)
class Layout:
    """Sizes of every parallel dimension. Build with `Layout.create`, which resolves ``zero1 <= 0`` to ``data``.

    ``data`` is ``world_size // (tensor * pipeline)``; when that division is not exact, `problems` says so.
    ``num_chunks`` is the number of model chunks (virtual pipeline stages) per pipeline rank.
    """

    world_size: int = 1
    tensor: int = 1
    pipeline: int = 1
    data: int = 1
    zero1: int = 1
    num_chunks: int = 1
    sequence_parallel: bool = False
    context: int = 1
    context_mode: str = "ring"

    @classmethod
    def create(
        cls,
        world_size: int,
        tensor: int = 1,
        pipeline: int = 1,
        zero1: int = -1,
        num_chunks: int = 1,
        sequence_parallel: bool = False,
        context: int = 1,
        context_mode: str = "ring",
    ) -> "Layout":
        """The layout of ``world_size`` processes; ``zero1 <= 0`` shards over the whole data-parallel group."""
        ok = tensor >= 1 and pipeline >= 1 and context >= 1
        data = world_size // (tensor * pipeline * context) if ok else 0
        return cls(
            world_size=world_size,
            tensor=tensor,
            pipeline=pipeline,
            data=data,
            zero1=data if zero1 <= 0 else zero1,
            num_chunks=num_chunks,
            sequence_parallel=bool(sequence_parallel),
            context=context,
            context_mode=context_mode,
        )

    @classmethod
    def single(cls) -> "Layout":
        """One process."""
        return cls()

    # ------------------------------------------------------------------ checks
    def problems(self) -> List[Problem]:
        """Sizes that do not tile the world; empty when the grid can be built."""
        if self.tensor < 1 or self.pipeline < 1 or self.context < 1:
            return [
                Problem(
                    "parallel.tensor / parallel.pipeline / parallel.context",
                    f"sizes must be >= 1, got tensor={self.tensor}, pipeline={self.pipeline}, context={self.context}",
                )
            ]
        if self.context_mode not in CONTEXT_MODES:
            return [Problem("parallel.context_mode", f"{self.context_mode!r} is not one of {', '.join(CONTEXT_MODES)}")]
        if self.world_size % (self.tensor * self.pipeline * self.context) or self.data < 1:
            key = "parallel.tensor / parallel.pipeline.size" + (" / parallel.context" if self.context > 1 else "")
            return [
                Problem(
                    key,
                    f"world size {self.world_size} is not a multiple of tensor ({self.tensor}) * "
                    f"pipeline ({self.pipeline})" + (f" * context ({self.context})" if self.context > 1 else ""),
                )
            ]
        if self.zero1 < 1 or self.data % self.zero1:
            return [
                Problem(
                    "parallel.zero1",
                    f"size {self.zero1} does not divide the data-parallel size {self.data} (world "
                    f"{self.world_size} / tensor {self.tensor} / pipeline {self.pipeline}); use a divisor of "
                    f"{self.data} or -1",
                )
            ]
        return []

    def fit_problems(self, model_config: Any, micro_bsz: int, seq_len: int, micro_num: int) -> List[Problem]:
        """`problems` plus what keeps ``model_config`` (an `InternLMConfig`) and this batch shape from running
        under this layout: tensor splits of the model, the pipeline partition, sequence-parallel tokens."""
        out = self.problems()
        out += tensor_split_problems(model_config, self.tensor)
        out += self.context_problems(model_config, seq_len)
        tokens = micro_bsz * seq_len // max(self.context, 1)  # a context rank's share of the micro-batch
        if self.sequence_parallel and tokens % self.tensor:
            per_rank = f" / parallel.context {self.context}" if self.context > 1 else ""
            out.append(
                Problem(
                    "parallel.sequence_parallel",
                    f"micro_bsz * seq_len{per_rank} = {micro_bsz} * {seq_len}{per_rank} = {tokens} tokens is not "
                    f"divisible by parallel.tensor size {self.tensor}",
                )
            )
        out += pipeline_problems(model_config.num_layers, self.pipeline, self.num_chunks, micro_num)
        return out

    def context_problems(self, model_config: Any, seq_len: int) -> List[Problem]:
        """What keeps ``seq_len`` and ``model_config``'s heads from splitting over the context group: ring needs
        ``seq_len % 2C == 0`` (zigzag: chunks i and 2C-1-i of every sequence), a2a ``seq_len % C == 0`` and the
        query heads of a tensor rank divisible by C (attention runs on heads / (T C) heads of the whole sequence;
        kv heads that C does not divide are replicated by the all-to-all)."""
        size = self.context
        if size <= 1:
            return []
        out: List[Problem] = []
        parts = 2 * size if self.context_mode == "ring" else size
        if seq_len % parts:
            out.append(
                Problem(
                    "data.seq_len / parallel.context",
                    f"{seq_len} is not divisible by {parts} (parallel.context {size}, parallel.context_mode "
                    f"{self.context_mode!r} splits each sequence into {parts} chunks)",
                )
            )
        if self.context_mode == "a2a":
            heads = model_config.num_attention_heads
            local = heads // max(self.tensor, 1)
            if local % size:
                out.append(
                    Problem(
                        "parallel.context / parallel.context_mode / model.num_attention_heads",
                        f"{local} query heads per parallel.tensor rank ({heads} / {self.tensor}) are not divisible by "
                        f"parallel.context {size}, as context_mode 'a2a' needs; use 'ring' or a context size dividing "
                        f"{local}",
                    )
                )
        return out

    # ------------------------------------------------------------------ ranks
    def coords(self, rank: int) -> Tuple[int, int, int]:
        """``(tp_rank, dp_rank, pp_rank)`` of global ``rank`` (its context rank: `cp_rank`)."""
        inner = self.tensor * self.context
        return rank % self.tensor, (rank // inner) % self.data, rank // (inner * self.data)

    def cp_rank(self, rank: int) -> int:
        """The context rank of global ``rank``."""
        return (rank // self.tensor) % self.context

    def rank_of(self, tp_rank: int, dp_rank: int, pp_rank: int, cp_rank: int = 0) -> int:
        """Global rank at grid coordinates ``(tp_rank, dp_rank, pp_rank, cp_rank)``."""
        return tp_rank + self.tensor * (cp_rank + self.context * (dp_rank + self.data * pp_rank))

    def group_ranks(self) -> Dict[str, List[List[int]]]:
        """Global ranks of every group of each kind, in creation order.

        ``tp``: ranks sharing (cp, dp, pp); ``dp``: ranks sharing (tp, cp, pp); ``pp``: ranks sharing (tp, cp, dp),
        ordered by stage; ``zero1``: consecutive blocks of ``zero1`` data-parallel ranks inside each dp group;
        ``zero1_replica``: the ranks holding the same slice of the optimizer state (the same zero1 rank in every
        zero1 block of every context rank); the optimizer all-reduces its reduced gradient slice over them, which
        sums the context ranks' gradients too; ``cp`` (only when context > 1): ranks sharing (tp, dp, pp), ordered
        by context rank.
        """
        tp, dp, pp, cp, z = self.tensor, self.data, self.pipeline, self.context, self.zero1

        def rank(t: int, d: int, p: int, c: int = 0) -> int:
            return self.rank_of(t, d, p, c)

        out: Dict[str, List[List[int]]] = {
            "tp": [[rank(t, d, p, c) for t in range(tp)] for p in range(pp) for d in range(dp) for c in range(cp)],
            "dp": [[rank(t, d, p, c) for d in range(dp)] for p in range(pp) for c in range(cp) for t in range(tp)],
            "pp": [[rank(t, d, p, c) for p in range(pp)] for d in range(dp) for c in range(cp) for t in range(tp)],
        }
        out["zero1"] = [ranks[b : b + z] for ranks in out["dp"] for b in range(0, dp, z)]
        out["zero1_replica"] = [
            [rank(t, d, p, c) for d in range(j, dp, z) for c in range(cp)]
            for p in range(pp)
            for t in range(tp)
            for j in range(z)
        ]
        if cp > 1:
            out["cp"] = [[rank(t, d, p, c) for c in range(cp)] for p in range(pp) for d in range(dp) for t in range(tp)]
        return out

    # ------------------------------------------------------------------ text and records
    def describe(self, style: str = "ranks") -> str:
        """The layout as text; every layout line the framework prints comes from here, in one of three styles:

        ``ranks`` (banner, logs): ``tp2+sp x pp1 x dp2 (zero1 2, 1 chunk, 4 ranks)``;
        ``sentence`` (``--dry-run``): ``4 devices = tensor 2 x pipeline 1 (chunks 1) x data 2; zero1 2; sequence
        parallel True``; ``compact`` (planner tables): ``tp2+sp pp1 dp2 zero1=2``, `` x2 chunks`` after pp when
        interleaved.
        """
        chunks, world = self.num_chunks, self.world_size
        sp = "+sp" if self.sequence_parallel else ""
        cp = f"cp{self.context}-{self.context_mode}" if self.context > 1 else ""
        cp_x, cp_sp = (f"{cp} x ", f"{cp} ") if cp else ("", "")
        if style == "ranks":
            return (
                f"tp{self.tensor}{sp} x {cp_x}pp{self.pipeline} x dp{self.data} (zero1 {self.zero1}, "
                f"{chunks} chunk{'s' if chunks != 1 else ''}, {world} rank{'s' if world != 1 else ''})"
            )
        if style == "sentence":
            context = f" x context {self.context} ({self.context_mode})" if self.context > 1 else ""
            return (
                f"{world} device{'s' if world != 1 else ''} = tensor {self.tensor}{context} x pipeline "
                f"{self.pipeline} (chunks {chunks}) x data {self.data}; zero1 {self.zero1}; sequence parallel "
                f"{self.sequence_parallel}"
            )
        if style == "compact":
            interleaved = f" x{chunks} chunks" if chunks > 1 else ""
            return f"tp{self.tensor}{sp} {cp_sp}pp{self.pipeline}{interleaved} dp{self.data} zero1={self.zero1}"
        raise ValueError(f"Layout.describe: unknown style {style!r}; use 'ranks', 'sentence' or 'compact'")

    def to_dict(self) -> Dict[str, Any]:
        """The record kept in a checkpoint's meta.json."""
        return asdict(self)

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> "Layout":
        """The layout a checkpoint's meta.json recorded; raises ValueError naming a missing or unknown field.

        Records written before context parallelism lack ``context`` / ``context_mode``: they default to 1 / ring."""
        record = {**_PRE_CONTEXT_DEFAULTS, **record}
        fields = set(cls.__dataclass_fields__)
        if set(record) != fields:
            missing, unknown = sorted(fields - set(record)), sorted(set(record) - fields)
            raise ValueError(f"not a layout record (missing {missing}, unknown {unknown})")
        return cls(**{k: record[k] for k in fields})


CONTEXT_MODES = ("ring", "a2a")
_PRE_CONTEXT_DEFAULTS = {"context": 1, "context_mode": "ring"}


# ---------------------------------------------------------------------------------------------- tensor splits
def kv_heads_supported(num_kv_heads: int, tp: int) -> bool:
    """Column-split k/v when tp divides the kv heads; replicated k/v when the kv heads divide tp.

    Other ratios would give a rank query heads that read a non-contiguous, uneven set of kv heads, which
    the attention kernel's "each kv head serves heads/kv_heads consecutive query heads" rule cannot express.
    """
    return num_kv_heads % tp == 0 or tp % num_kv_heads == 0


def tensor_split_problems(model_config: Any, tp: int) -> List[Problem]:
    """Shapes of ``model_config`` (an `InternLMConfig`) that cannot be split over ``tp`` tensor ranks."""
    out: List[Problem] = []
    if tp < 1:
        return out
    heads = model_config.num_attention_heads
    kv_heads = model_config.num_kv_attention_heads or heads
    size = f"parallel.tensor size {tp}"
    if heads % tp:
        out.append(Problem("model.num_attention_heads", f"{heads} is not divisible by {size}"))
    if model_config.hidden_size % tp:
        out.append(Problem("model.hidden_size", f"{model_config.hidden_size} is not divisible by {size}"))
    if model_config.intermediate_size % tp:
        out.append(
            Problem("model.mlp_ratio", f"intermediate size {model_config.intermediate_size} is not divisible by {size}")
        )
    if model_config.vocab_size % tp:
        out.append(
            Problem(
                "model.vocab_size",
                f"{model_config.vocab_size} is not divisible by {size}; pad the vocab to a multiple of {tp}",
            )
        )
    if not kv_heads_supported(kv_heads, tp):
        out.append(
            Problem(
                "model.num_kv_attention_heads",
                f"{kv_heads} kv heads can neither be split over nor replicated across {size}; one must divide the "
                f"other",
            )
        )
    return out


__all__ = ["CONTEXT_MODES", "Layout", "kv_heads_supported", "tensor_split_problems"]
