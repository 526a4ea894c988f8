"""Generate the tables of figures in README.md and docs/*.md from the code, so they cannot go stale.

    python tools/docs_tables.py                   # rewrite every generated table in place
    python tools/docs_tables.py --check           # exit 1 naming each doc and table that differs (CI)
    python tools/docs_tables.py --measure NAME    # rerun a measurement (slow) and write its table, machine and date

A table lives between ``<!-- docs_tables:NAME -->`` and ``<!-- /docs_tables:NAME -->`` in its doc. Computed tables
(``TABLES``) are deterministic: planner estimates (`internlm.planning` through ``tools/plan.py``'s own argument
handling), the rank grid of `Layout`, the activation table of `internlm.planning.activations`' docstring. Measured
tables (``MEASURED``: byte counts a test prints; no timings) are rewritten only by ``--measure``, which names the
machine and date in the block; ``--check`` then only checks that such a block is there and says where it came from.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import re
import shlex
import subprocess
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))

MEASURED_NOTE = "Measured by `python tools/docs_tables.py --measure {name}` on "


def _markers(name: str) -> Tuple[str, str]:
    return f"<!-- docs_tables:{name} -->", f"<!-- /docs_tables:{name} -->"


def _table(header: Sequence[str], rows: List[Sequence[str]], align: Sequence[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ computed tables
def rank_grid() -> str:
    """docs/parallel.md: ranks and groups of 8 ranks at tensor 2, pipeline 2, zero1 1 (`Layout.group_ranks`)."""
    from internlm.parallel.layout import Layout

    layout = Layout.create(8, 2, 2, 1, 1, False)
    groups = layout.group_ranks()

    def member(kind: str, rank: int) -> str:
        return " ".join(str(r) for r in next(g for g in groups[kind] if rank in g))

    rows = []
    for rank in range(layout.world_size):
        tp, dp, pp = layout.coords(rank)
        stages = next(g for g in groups["pp"] if rank in g)
        prev = stages[pp - 1] if pp > 0 else None
        nxt = stages[pp + 1] if pp + 1 < len(stages) else None
        row = [rank, tp, dp, pp, member("tp", rank), member("dp", rank), member("pp", rank), member("zero1", rank)]
        rows.append(row + [f"{prev} / {nxt}"])
    header = ["rank", "tp_rank", "dp_rank", "pp_rank", "tp group", "dp group", "pp group", "zero1 group"]
    return _table(header + ["pp_prev / pp_next"], rows, ["---:"] * 4 + ["---"] * 5)


def _plan(args: str):
    """``tools/plan.py ARGS``'s estimate: the same inputs the tool builds (flags over config or preset)."""
    import plan as plan_tool

    from internlm.planning import estimate

    argv = shlex.split(args)
    argv = [os.path.join(REPO, a) if a.startswith("configs/") else a for a in argv]  # from any directory
    p = plan_tool.plan_inputs(plan_tool.parse_args(argv))
    return p, estimate(p.mc, p.layout, p.batch, p.checkpoint, p.hardware, p.attn_backend, p.fused_loss)


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f}"


# (label, tools/plan.py arguments): the memory table of docs/parallel.md
MEMORY_ROWS = [
    ("7B, shipped", "--config configs/internlm_7b/phase1.py --devices 128 --device-type a100-80gb"),
    ("7B, zero1 8", "--config configs/internlm_7b/phase1.py --devices 128 --device-type a100-80gb --zero1 8"),
    ("7B phase 2, shipped", "--config configs/internlm_7b/phase2.py --devices 128 --device-type a100-80gb"),
    (
        "7B, tp 2 + SP, micro_bsz 2",
        "--config configs/internlm_7b/phase1.py --devices 128 --device-type a100-80gb --tensor 2 --sp --micro-bsz 2 "
        "--micro-num 8",
    ),
    (
        "20B",
        "--preset internlm-20b --devices 128 --device-type a100-80gb --tensor 4 --sp --zero1 8 --seq-len 4096 "
        "--micro-num 8",
    ),
    (
        "20B, no SP",
        "--preset internlm-20b --devices 128 --device-type a100-80gb --tensor 4 --no-sp --zero1 8 --seq-len 4096 "
        "--micro-num 8",
    ),
    (
        "20B, pp 2",
        "--preset internlm-20b --devices 128 --device-type a100-80gb --tensor 4 --sp --pipeline 2 --zero1 8 "
        "--seq-len 4096 --micro-num 8",
    ),
    ("104B, shipped", "--config configs/internlm_104b/phase1.py --devices 2048 --device-type a100-80gb"),
    (
        "104B, checkpoint True",
        "--config configs/internlm_104b/phase1.py --devices 2048 --device-type a100-80gb --checkpoint True",
    ),
    ("104B, zero1 8", "--config configs/internlm_104b/phase1.py --devices 2048 --device-type a100-80gb --zero1 8"),
    ("104B, S 4096", "--config configs/internlm_104b/phase1.py --devices 2048 --device-type a100-80gb --seq-len 4096"),
    (
        "104B, former layout",
        "--config configs/internlm_104b/phase1.py --devices 2048 --device-type a100-80gb --tensor 8 --sp "
        "--pipeline 4 --chunks 2 --zero1 8 --micro-num 32 --checkpoint True",
    ),
]

# (label, tools/plan.py arguments): the shipped configs against the layouts they replaced
SHIPPED_ROWS = [MEMORY_ROWS[11], MEMORY_ROWS[7], MEMORY_ROWS[1], MEMORY_ROWS[0]] + [
    (
        "7B phase 2, former layout",
        "--config configs/internlm_7b/phase2.py --devices 128 --device-type a100-80gb --zero1 8 --checkpoint 0.5",
    ),
    MEMORY_ROWS[2],
]


def memory_table() -> str:
    """docs/parallel.md: memory per GPU of the shipped and nearby layouts, as `tools/plan.py` estimates them."""
    from internlm.planning import checkpoint_text

    rows = []
    for label, args in MEMORY_ROWS:
        p, e = _plan(args)
        m, b = e.memory, e.batch
        states = f"{_gib(m['weights'])} + {_gib(m['gradients'])} + {_gib(m['optimizer'])}"
        rows.append(
            [
                label,
                f"{p.layout.describe('compact')}, checkpoint {checkpoint_text(e.checkpoint)}",
                f"S {b.seq_len} × {b.micro_bsz}, micro_num {b.micro_num}",
                states,
                f"{_gib(m['activations'])} (+ {_gib(m['transient'])})",
                f"{_gib(m['total'])} GiB",
            ]
        )
    header = ["model", "layout (`--devices` GPUs)", "batch", "states w + g + opt (GiB)", "activations (+ transient)"]
    return _table(header + ["total per GPU"], rows, ["---"] * 5 + ["---:"])


def shipped_table() -> str:
    """docs/parallel.md: step time estimates of the shipped configs and the layouts they replaced."""
    from internlm.planning import checkpoint_text

    rows = []
    for label, args in SHIPPED_ROWS:
        p, e = _plan(args)
        t = e.times
        rows.append(
            [
                label,
                f"{p.layout.describe('compact')}, checkpoint {checkpoint_text(e.checkpoint)}, micro_num "
                f"{e.batch.micro_num}",
                f"{_gib(e.memory['total'])} GiB",
                f"{t['tokens_per_device_s']:,.0f}",
                f"{t['mfu']:.1%}",
            ]
        )
    return _table(["config", "layout", "memory per GPU", "tokens/GPU/s", "MFU"], rows, ["---", "---"] + ["---:"] * 3)


def activation_table() -> str:
    """docs/parallel.md: the per-layer activation table and its formula, as `internlm.planning.activations`'s
    docstring (the module that counts them) states them."""
    from internlm.planning import activations

    doc = activations.__doc__ or ""
    start = doc.index("| tensor | saved by | bytes |")
    end = doc.index("Backends:", start)
    text = doc[start:end].rstrip()
    return re.sub(r"``([^`]+)``", r"`\1`", text)


TABLES: Dict[str, Tuple[str, Callable[[], str]]] = {
    "ranks": ("docs/parallel.md", rank_grid),
    "memory": ("docs/parallel.md", memory_table),
    "shipped": ("docs/parallel.md", shipped_table),
    "activations": ("docs/parallel.md", activation_table),
}


# ------------------------------------------------------------------------------------------ measured tables
def _pytest_output(node: str) -> str:
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", node]
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: {node} failed; fix it before measuring:\n{proc.stdout[-3000:]}")
    return proc.stdout


def _printed_table(out: str, title: str) -> str:
    """The markdown table `tests/planning/test_memory_model.py` prints under ``title``."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title)) + 1
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append("| " + " | ".join("---" if set(c) == {"-"} else c for c in cells) + " |")
    return "\n".join(rows)


def measure_saved() -> str:
    out = _pytest_output("tests/planning/test_memory_model.py::test_saved_activations_match_the_model")
    return _printed_table(out, "activations saved per micro-batch")


def measure_peak() -> str:
    out = _pytest_output("tests/planning/test_memory_model.py::test_peak_memory_of_training_steps_matches_the_model")
    return _printed_table(out, "peak tensor memory per process")


def measure_checkpoint_bytes() -> str:
    node = "tests/checkpoint/test_checkpoint.py::"
    out = _pytest_output(node + "test_dp4_zero1_2_checkpoint_has_single_process_bytes_and_one_writer_per_file")
    single, dp4 = re.search(r"checkpoint bytes: single process (\d+), dp4 zero1 2 (\d+)", out).groups()
    rows = [["one process", f"{int(single):,}"], ["dp 4, zero1 2 (4 processes)", f"{int(dp4):,}"]]
    return _table(["layout (test model, step 3)", "checkpoint bytes"], rows, ["---", "---:"])


MEASURED: Dict[str, Tuple[str, Callable[[], str]]] = {
    "saved": ("docs/parallel.md", measure_saved),
    "peak": ("docs/parallel.md", measure_peak),
    "checkpoint-bytes": ("docs/checkpoint.md", measure_checkpoint_bytes),
}


def _machine() -> str:
    cores = os.cpu_count()
    import torch

    return f"{platform.machine()} {platform.system()}, {cores} CPU cores, torch {torch.__version__}"


# ------------------------------------------------------------------------------------------ blocks in docs
def block(text: str, name: str, path: str) -> Optional[str]:
    """The content between ``name``'s markers in ``text`` (None when they are missing)."""
    begin, end = _markers(name)
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        return None
    return text[text.index(begin) + len(begin) : text.index(end)].strip("\n")


def replace_block(text: str, name: str, content: str) -> str:
    begin, end = _markers(name)
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{content}\n{end}{tail}"


@functools.lru_cache(maxsize=None)
def computed(name: str) -> str:
    """Table ``name`` of `TABLES` as the code gives it (once per process: the code does not change under it)."""
    return TABLES[name][1]()


def check(root: str = REPO) -> List[str]:
    """One line per doc table that differs from what the code gives now (or lacks its markers)."""
    problems = []
    for name, (doc, _) in TABLES.items():
        with open(os.path.join(root, doc)) as f:
            current = block(f.read(), name, doc)
        if current is None:
            problems.append(f"{doc}: table {name!r} has no <!-- docs_tables:{name} --> ... markers")
        elif current != computed(name):
            problems.append(f"{doc}: table {name!r} differs from the code; run python tools/docs_tables.py")
    for name, (doc, _) in MEASURED.items():
        with open(os.path.join(root, doc)) as f:
            current = block(f.read(), name, doc)
        if current is None or MEASURED_NOTE.format(name=name) not in current:
            problems.append(f"{doc}: measured table {name!r} is missing or does not name its machine and date")
    return problems


def write(names: Sequence[str], measured: bool, root: str = REPO) -> None:
    for name in names:
        doc, make = (MEASURED if measured else TABLES)[name]
        path = os.path.join(root, doc)
        with open(path) as f:
            text = f.read()
        if block(text, name, doc) is None:
            raise SystemExit(f"error: {doc}: no <!-- docs_tables:{name} --> ... <!-- /docs_tables:{name} --> markers")
        content = make()
        if measured:
            day = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
            content += "\n\n" + MEASURED_NOTE.format(name=name) + f"{_machine()}, {day}."
        with open(path, "w") as f:
            f.write(replace_block(text, name, content))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 when a doc's table differs from the code")
    p.add_argument("--measure", choices=sorted(MEASURED), nargs="+", help="rerun these measurements (slow)")
    p.add_argument("--root", default=REPO, help=argparse.SUPPRESS)  # a copy of the repository (tests)
    args = p.parse_args(argv)
    if args.check:
        problems = check(args.root)
        for line in problems:
            print(line, file=sys.stderr)
        return 1 if problems else 0
    if args.measure:
        write(args.measure, measured=True, root=args.root)
    else:
        write(list(TABLES), measured=False, root=args.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
