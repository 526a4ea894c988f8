"""Which decoder layers each pipeline stage holds, and the per-stage model chunks.

Partitioning rule. The ``num_layers`` layers are split into ``pp_size * num_chunks`` *virtual stages* of
consecutive layers, as evenly as possible: every virtual stage gets ``num_layers // V`` layers and the first
``num_layers % V`` virtual stages one more. Virtual stage ``v`` lives on pipeline rank ``v % pp_size`` as its
chunk ``v // pp_size`` (Megatron's interleaving: ``v = chunk * pp_size + stage``). With ``num_chunks == 1``
this is the plain contiguous split, stage r holding virtual stage r.

The embedding lives on virtual stage 0 (rank 0, chunk 0); the final norm and the output head on the last
virtual stage (rank pp_size - 1, chunk num_chunks - 1).
"""

from __future__ import annotations

from typing import List, Union

import torch

from internlm.model import InternLM, InternLMConfig
from internlm.problems import Problem


def partition_layers(num_layers: int, pp_size: int, num_chunks: int = 1) -> List[List[range]]:
    """Global layer indices as ``[stage][chunk] -> range``; see the module docstring for the rule."""
    if pp_size < 1 or num_chunks < 1:
        raise ValueError(f"pp_size ({pp_size}) and num_chunks ({num_chunks}) must be positive")
    virtual = pp_size * num_chunks
    if num_layers < virtual:
        raise ValueError(
            f"{num_layers} layers cannot fill {pp_size} stages x {num_chunks} chunks = {virtual} virtual stages"
        )
    base, extra = divmod(num_layers, virtual)
    ranges, start = [], 0
    for v in range(virtual):
        size = base + (1 if v < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return [[ranges[chunk * pp_size + stage] for chunk in range(num_chunks)] for stage in range(pp_size)]


def pipeline_problems(num_layers: int, pp_size: int, num_chunks: int, micro_num: int) -> List[Problem]:
    """Reasons this pipeline partition and schedule cannot run, one `Problem` each; empty when usable."""
    if pp_size < 1:
        return [Problem("parallel.pipeline.size", f"must be positive, got {pp_size}")]
    if num_chunks < 1:
        return [Problem("model.num_chunks", f"must be positive, got {num_chunks}")]
    problems = []
    if num_chunks > 1 and pp_size == 1:
        problems.append(
            Problem("model.num_chunks", f"{num_chunks} chunks need a pipeline (parallel.pipeline.size > 1); use 1")
        )
    if num_layers < pp_size * num_chunks:
        problems.append(
            Problem(
                "model.num_layers",
                f"{num_layers} layers are fewer than parallel.pipeline.size * model.num_chunks = {pp_size} * "
                f"{num_chunks} virtual stages",
            )
        )
    if micro_num < 1:
        problems.append(Problem("data.micro_num", f"must be positive, got {micro_num}"))
    elif pp_size > 1 and num_chunks > 1 and micro_num % pp_size:
        problems.append(
            Problem(
                "data.micro_num",
                f"the interleaved schedule needs a multiple of parallel.pipeline.size={pp_size}, got {micro_num}",
            )
        )
    elif pp_size > 1 and micro_num < pp_size:
        problems.append(
            Problem(
                "data.micro_num",
                f"{micro_num} is smaller than parallel.pipeline.size={pp_size}; 1F1B needs at least one "
                f"micro-batch per stage to fill the pipeline",
            )
        )
    return problems


def build_pipeline_chunks(
    config: InternLMConfig,
    pp_rank: int,
    pp_size: int,
    num_chunks: int = 1,
    device: Union[str, torch.device] = "meta",
    seed: int = 0,
) -> List[InternLM]:
    """The model chunks of pipeline rank ``pp_rank``: chunk c holds virtual stage ``c * pp_size + pp_rank``.

    Each chunk is an `InternLM` keeping only its layers under their global ``layers.{i}`` keys, so parameter
    names equal the full model's. Built on the meta device (no memory); the caller materialises with
    ``chunk.to_empty(device=...)`` and ``chunk.init_weights(seed)``. A real ``device`` does both here.
    """
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank {pp_rank} is outside a pipeline of {pp_size} stages")
    stages = partition_layers(config.num_layers, pp_size, num_chunks)
    last_virtual = pp_size * num_chunks - 1
    chunks = []
    for chunk_id, layers in enumerate(stages[pp_rank]):
        virtual = chunk_id * pp_size + pp_rank
        with torch.device("meta"):  # the full model on meta costs nothing; prune before materialising
            model = InternLM(config)
        for key in list(model.layers.keys()):
            if int(key) not in layers:
                del model.layers[key]
        if virtual != 0:
            model.embed_tokens = None
        if virtual != last_virtual:
            model.norm = None
            model.lm_head = None
        if torch.device(device).type != "meta":
            model.to_empty(device=device)
            model.init_weights(seed)
        chunks.append(model)
    return chunks
