"""Checks that a model fits a tensor / data-parallel layout, before any process group exists.

`tensor_layout_problems` returns one line per problem, each starting with the config key to change, so
config validation and planning tools can print them all at once. (Pipeline checks live in
`internlm.parallel.pipeline`.)
"""

from __future__ import annotations

from typing import Any, List

from .process_groups import config_size, config_value


def kv_heads_supported(num_kv_heads: int, tp: int) -> bool:
    """Column-split k/v when tp divides the kv heads; replicated k/v when the kv heads divide tp.

    Other ratios would give a rank query heads that read a non-contiguous, uneven set of kv heads, which
    the attention kernel's "each kv head serves heads/kv_heads consecutive query heads" rule cannot express.
    """
    return num_kv_heads % tp == 0 or tp % num_kv_heads == 0


def model_tensor_problems(model_config: Any, tp: int) -> List[str]:
    """Shapes of ``model_config`` that cannot be split over ``tp`` tensor ranks (one line per key)."""
    problems: List[str] = []
    heads = model_config.num_attention_heads
    kv_heads = model_config.num_kv_attention_heads or heads
    if heads % tp:
        problems.append(f"model.num_attention_heads: {heads} is not divisible by parallel.tensor size {tp}")
    if model_config.hidden_size % tp:
        problems.append(f"model.hidden_size: {model_config.hidden_size} is not divisible by parallel.tensor size {tp}")
    if model_config.intermediate_size % tp:
        problems.append(
            f"model.mlp_ratio: intermediate size {model_config.intermediate_size} is not divisible by "
            f"parallel.tensor size {tp}"
        )
    if model_config.vocab_size % tp:
        problems.append(f"model.vocab_size: {model_config.vocab_size} is not divisible by parallel.tensor size {tp}; "
                        f"pad the vocab to a multiple of {tp}")
    if not kv_heads_supported(kv_heads, tp):
        problems.append(
            f"model.num_kv_attention_heads: {kv_heads} kv heads can neither be split over nor replicated across "
            f"parallel.tensor size {tp}; one must divide the other"
        )
    return problems


def tensor_layout_problems(
    model_config: Any, parallel_cfg: Any, world_size: int, seq_len: int, micro_bsz: int
) -> List[str]:
    """Problems of running ``model_config`` (an `InternLMConfig`) with ``parallel_cfg`` on ``world_size`` ranks.

    Empty list: the tensor and data dimensions are consistent.
    """
    problems: List[str] = []
    tp = config_size(config_value(parallel_cfg, "tensor"), 1)
    pp = config_size(config_value(parallel_cfg, "pipeline"), 1)
    zero1 = config_size(config_value(parallel_cfg, "zero1"), -1)
    if tp < 1 or pp < 1:
        return [f"parallel.tensor / parallel.pipeline: sizes must be >= 1, got tensor={tp}, pipeline={pp}"]
    if world_size % (tp * pp):
        problems.append(
            f"parallel.tensor / parallel.pipeline.size: world size {world_size} is not a multiple of "
            f"tensor ({tp}) * pipeline ({pp})"
        )
    else:
        dp = world_size // (tp * pp)
        if zero1 > 0 and dp % zero1:
            problems.append(
                f"parallel.zero1: size {zero1} does not divide the data-parallel size {dp} "
                f"(world {world_size} / tensor {tp} / pipeline {pp}); use a divisor of {dp} or -1"
            )

    problems += model_tensor_problems(model_config, tp)
    if bool(config_value(parallel_cfg, "sequence_parallel", False)) and (micro_bsz * seq_len) % tp:
        problems.append(
            f"parallel.sequence_parallel: micro_bsz * seq_len = {micro_bsz} * {seq_len} = {micro_bsz * seq_len} "
            f"tokens is not divisible by parallel.tensor size {tp}"
        )
    return problems


__all__ = ["tensor_layout_problems", "model_tensor_problems", "kv_heads_supported"]
