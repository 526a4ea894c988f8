"""Pipeline consistency: every send of one simulated rank must meet a receive of its peer, in the same order,
with the same shape and dtype.

On a cluster the two ends of a link post their operations independently; NCCL pairs them by order, so a send
without its receive (or a receive of another shape) hangs both ranks or corrupts the message. For every pair of
simulated ranks ``(a, b)`` the sends of ``a`` to ``b`` are compared, in order, with the receives of ``b`` from
``a`` (over both simulated steps); the first difference is reported as the deadlock it would be.
"""

from __future__ import annotations

from typing import Any, List, Sequence

from .recorder import Op


def _p2p(result: Any) -> List[Op]:
    return [op for op in list(result.first_step_ops) + list(result.ops) if op.is_p2p]


def link_problems(sender: int, sends: Sequence[Op], receiver: int, recvs: Sequence[Op]) -> List[str]:
    """The first mismatch between ``sends`` (sender -> receiver, in order) and ``recvs`` (at the receiver)."""
    for i, (send, recv) in enumerate(zip(sends, recvs)):
        if (send.shape, send.dtype, send.tag) != (recv.shape, recv.dtype, recv.tag):
            return [
                f"message {i} from rank {sender} to rank {receiver}: sent {send.shape} {send.dtype} tag {send.tag}, "
                f"received as {recv.shape} {recv.dtype} tag {recv.tag}; the ranks would hang or read garbage"
            ]
    if len(sends) != len(recvs):
        more, who = ("sends", sender) if len(sends) > len(recvs) else ("receives", receiver)
        return [
            f"rank {sender} sends {len(sends)} messages to rank {receiver}, which receives {len(recvs)}: rank {who}'s "
            f"extra {more} would wait forever (deadlock)"
        ]
    return []


def check_pipeline(results: Sequence[Any], layout: Any = None) -> List[str]:
    """Problems between every pair of simulated ranks that exchanged point-to-point messages (module docstring)."""
    by_rank = {r.rank: _p2p(r) for r in results}
    problems: List[str] = []
    for a, ops_a in by_rank.items():
        for b, ops_b in by_rank.items():
            sends = [op for op in ops_a if op.kind in ("send", "isend") and op.peer == b]
            recvs = [op for op in ops_b if op.kind in ("recv", "irecv") and op.peer == a]
            if sends or recvs:
                problems += link_problems(a, sends, b, recvs)
    return problems


__all__ = ["check_pipeline", "link_problems"]
