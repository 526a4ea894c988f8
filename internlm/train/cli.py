"""`train.py`: parse arguments, load and check every phase config, then train (or print the plan).

Exit codes: 0 success, 2 a config or layout error (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence, Tuple

from internlm.config import ConfigError, RunConfig, load_run_config
from internlm.errors import record_exit_status

from .distributed import world_size_from_env
from .phases import Phase, plan_phases


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Pretrain an InternLM model. Several --config files run as phases, in order; rerunning the "
        "same command resumes where it stopped.",
    )
    parser.add_argument(
        "--config",
        nargs="+",
        required=True,
        metavar="FILE",
        help="config file(s) in InternLM format; several files are phases run in order",
    )
    parser.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a config key in every phase (repeatable), e.g. --set data.micro_bsz=2",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan of every phase and exit")
    parser.add_argument(
        "--throughput",
        type=float,
        default=None,
        metavar="TGS",
        help="with --dry-run: tokens per GPU per second used for time estimates",
    )
    parser.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="with --dry-run: number of devices to plan for; with --simulate: the simulated world (default: "
        "WORLD_SIZE or 1)",
    )
    parser.add_argument(
        "--simulate",
        action="store_true",
        help="run the first phase's training step for chosen ranks of --world-size on a fake process group and "
        "fake tensors (no GPU, no data needed); print bytes per dimension, peak memory and checkpoint bytes beside "
        "the planner's figures (docs/scale.md)",
    )
    parser.add_argument(
        "--ranks",
        default=None,
        metavar="R,R,...",
        help="with --simulate: the ranks to simulate (default: the first rank of the first, a middle and the last "
        "pipeline stage)",
    )
    parser.add_argument(
        "--report", default=None, metavar="FILE.json", help="with --simulate: write the simulated figures as JSON"
    )
    return parser.parse_args(argv)


def _model_shape(config: RunConfig) -> dict:
    """What must stay the same across phases (rotary has no learned positions, so context length may change)."""
    shape = config.model_config.to_dict()
    shape.pop("max_position_embeddings")
    return shape


def check_phases(phases: List[Phase]) -> None:
    """Checks that need all phases or the world size; raise ConfigError naming the file and key."""
    first = phases[0].config
    for phase in phases:
        config, file = phase.config, phase.config_file
        problems = phase.layout.fit_problems(
            config.model_config, config.data.micro_bsz, config.data.seq_len, config.data.micro_num
        )
        if problems:
            raise ConfigError.from_problem(problems[0], file)
        max_positions = config.model_config.max_position_embeddings
        scaled = getattr(config.model_config, "rope_scaling", None)  # rotary scaling is built to go past it
        if config.data.seq_len > max_positions and not scaled:
            raise ConfigError(
                "data.seq_len",
                f"{config.data.seq_len} exceeds model.max_position_embeddings={max_positions}, the longest sequence "
                f"the model is built for; lower data.seq_len or raise model.max_position_embeddings",
                file,
            )
        if _model_shape(config) != _model_shape(first):
            raise ConfigError("model", f"differs from {first.file}; all phases train the same model", file)
        if phase.index > 0 and phase.layout != phases[phase.index - 1].layout and not first.ckpt.enable_save_ckpt:
            raise ConfigError(
                "parallel",
                "the layout differs from the previous phase's, and a layout change goes "
                "through the previous phase's final checkpoint; set ckpt.enable_save_ckpt=True",
                file,
            )
        if config.work_dir != first.work_dir:
            raise ConfigError(
                "work_dir",
                f"{config.work_dir!r} differs from {first.work_dir!r} of {first.file}; all "
                f"phases of a run share one work_dir",
                file,
            )
        start, end = config.profile.start_step, config.profile.end_step
        if end is not None and (start is None or end < start):
            problem = "set without profile.start_step" if start is None else f"is before profile.start_step {start}"
            raise ConfigError("profile.end_step", f"{end} {problem}", file)
        if not config.data.train_folder and not config.data.prepare_demo_data:
            raise ConfigError(
                "data.train_folder", "not set; point it at a folder of tokenized shards (see tools/tokenizer.py)", file
            )


def load_phases(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, List[Phase]]:
    """Parse the command line, load every phase config once and plan the phases for the world size."""
    args = parse_args(argv)
    world_size = args.world_size or world_size_from_env()
    configs = [load_run_config(path, args.set) for path in args.config]
    phases = plan_phases(configs, world_size)
    check_phases(phases)
    return args, phases


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`train.py`'s entry point; returns the exit status (also written to ``$INTERNLM_EXIT_STATUS_FILE``)."""
    status = 1  # what Python exits with on an uncaught exception
    try:
        status = _main(argv)
    finally:
        record_exit_status(status)
    return status


def _simulate(args: argparse.Namespace, phases: List[Phase]) -> int:
    # the simulation package sits above the trainer (it runs the Trainer's collaborators): imported on demand
    from internlm.simulation import parse_ranks, run_simulation

    world_size = args.world_size or world_size_from_env()
    try:
        ranks = parse_ranks(args.ranks, world_size)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_simulation(phases, world_size, ranks, args.report)


def _main(argv: Optional[Sequence[str]]) -> int:
    try:
        args, phases = load_phases(argv)
    except ConfigError as exc:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: say it once
            print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.simulate:
        return _simulate(args, phases)
    if args.dry_run:
        from .dry_run import print_dry_run

        print_dry_run(phases, args.throughput)
        return 0
    from .run import EXIT_ABORTED, run_training

    try:
        return run_training(phases)
    except KeyboardInterrupt:  # Ctrl-C before the trainer's handler is installed: nothing to save yet
        if os.environ.get("RANK", "0") == "0":
            print("interrupted by Ctrl-C during start-up; nothing saved", file=sys.stderr)
        return EXIT_ABORTED
