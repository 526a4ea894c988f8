"""Run a function on N CPU processes with the gloo backend (spawn start method, never fork).

    results = run_distributed(my_fn, world_size=4, arg1, arg2)

`my_fn(rank, world_size, *args)` must live at module level of an importable module; it runs after
`torch.distributed` is initialised and its return value (picklable, torch tensors allowed) comes back
in rank order. An exception on any rank fails the call with that rank's traceback.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import traceback
from typing import Any, Callable, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, store_dir: str, fn: Callable, args: tuple) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    # a bounded wait: a rank that dies or hangs fails its peers' collectives in minutes, not gloo's default 30
    timeout = datetime.timedelta(minutes=5)
    dist.init_process_group(
        "gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=world_size, timeout=timeout
    )
    try:
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "value": result}, os.path.join(store_dir, f"result{rank}.pt"))
    except BaseException:  # report to the parent, which raises
        torch.save({"ok": False, "value": traceback.format_exc()}, os.path.join(store_dir, f"result{rank}.pt"))
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any) -> List[Any]:
    with tempfile.TemporaryDirectory() as store_dir:
        try:
            mp.start_processes(_worker, args=(world_size, store_dir, fn, args), nprocs=world_size, start_method="spawn")
        except Exception as exc:
            errors = []
            for rank in range(world_size):
                path = os.path.join(store_dir, f"result{rank}.pt")
                if os.path.exists(path):
                    out = torch.load(path, weights_only=False)
                    if not out["ok"]:
                        errors.append(f"rank {rank}:\n{out['value']}")
            raise RuntimeError("distributed run failed\n" + "\n".join(errors)) from exc
        results = []
        for rank in range(world_size):
            out = torch.load(os.path.join(store_dir, f"result{rank}.pt"), weights_only=False)
            results.append(out["value"])
        return results
