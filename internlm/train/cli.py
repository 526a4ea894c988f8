"""`train.py`: parse arguments, load and check every phase config, then train (or print the plan).

Exit codes: 0 success, 2 a config or layout error (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, List, Optional, Sequence, Tuple

from internlm.config import ConfigError, load_config, model_config_from

from .distributed import world_size_from_env
from .phases import Phase, plan_phases


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Pretrain an InternLM model. Several --config files run as phases, in order; rerunning the "
        "same command resumes where it stopped.",
    )
    parser.add_argument("--config", nargs="+", required=True, metavar="FILE",
                        help="config file(s) in InternLM format; several files are phases run in order")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY.PATH=VALUE",
                        help="override a config key in every phase (repeatable), e.g. --set data.micro_bsz=2")
    parser.add_argument("--dry-run", action="store_true", help="print the plan of every phase and exit")
    parser.add_argument("--throughput", type=float, default=None, metavar="TGS",
                        help="with --dry-run: tokens per GPU per second used for time estimates")
    parser.add_argument("--world-size", type=int, default=None,
                        help="with --dry-run: number of devices to plan for (default: WORLD_SIZE or 1)")
    return parser.parse_args(argv)


def _model_shape(cfg: Any) -> dict:
    """What must stay the same across phases (rotary has no learned positions, so context length may change)."""
    shape = model_config_from(cfg).to_dict()
    shape.pop("max_position_embeddings")
    return shape


def check_phases(configs: List[Tuple[str, Any]], world_size: int) -> None:
    """Checks that need all phases or the world size; raise ConfigError naming the file and key."""
    from internlm.parallel.layout import tensor_layout_problems
    from internlm.parallel.pipeline import pipeline_layout_problems

    from .phases import parallel_sizes
    from .reshard import config_layout

    first_path, first = configs[0]
    previous_layout = None
    for path, cfg in configs:
        model_config = model_config_from(cfg)
        _, pp, _ = parallel_sizes(cfg, world_size)
        problems = tensor_layout_problems(model_config, cfg.parallel, world_size, cfg.data.seq_len, cfg.data.micro_bsz)
        problems += pipeline_layout_problems(model_config.num_layers, pp, cfg.model.num_chunks, cfg.data.micro_num)
        if problems:
            raise ConfigError(f"{path}: {problems[0]}")
        if _model_shape(cfg) != _model_shape(first):
            raise ConfigError(f"{path}: model: differs from {first_path}; all phases train the same model")
        layout = config_layout(cfg, world_size)
        if previous_layout not in (None, layout) and not first.ckpt.enable_save_ckpt:
            raise ConfigError(f"{path}: parallel: the layout differs from the previous phase's, and a layout change "
                              f"goes through the previous phase's final checkpoint; set ckpt.enable_save_ckpt=True")
        previous_layout = layout
        if cfg.work_dir != first.work_dir:
            raise ConfigError(f"{path}: work_dir: {cfg.work_dir!r} differs from {first.work_dir!r} of {first_path}; "
                              f"all phases of a run share one work_dir")
        if not cfg.data.train_folder and not cfg.data.prepare_demo_data:
            raise ConfigError(f"{path}: data.train_folder: not set; point it at a folder of tokenized shards "
                              f"(see tools/tokenize.py)")


def load_phases(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, List[Phase]]:
    args = parse_args(argv)
    world_size = args.world_size or world_size_from_env()
    configs = [(path, load_config(path, args.set)) for path in args.config]
    check_phases(configs, world_size)
    try:
        phases = plan_phases(configs, world_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return args, phases


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args, phases = load_phases(argv)
    except ConfigError as exc:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: say it once
            print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        from .plan import print_plan

        print_plan(phases, args.world_size or world_size_from_env(), args.throughput)
        return 0
    from .run import run_training

    return run_training(phases)
