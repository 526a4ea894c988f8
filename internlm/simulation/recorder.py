"""Every collective and point-to-point operation of a stretch of code, recorded by wrapping torch.distributed.

`CommRecorder` replaces the torch.distributed functions below by wrappers while it is active (``with
CommRecorder() as rec:``) and restores them after; a call made from inside another wrapped call (a deprecated name
calling the new one) counts once. Each call becomes an `Op`: kind, group, group size, peer, shape, dtype and the
bytes this rank *sends* with ring algorithms (``B`` = bytes of the full tensor, ``g`` = group size):

    all_reduce        2 (g-1)/g B
    reduce_scatter    (g-1)/g B      (B = the input, the whole tensor)
    all_gather        (g-1)/g B      (B = the output)
    all_to_all_single (g-1)/g B      (B = the input; the piece for itself stays)
    broadcast         (g-1)/g B      (the root's pipeline share; counted on every rank alike)
    send / isend      B               (a receive sends nothing)

`dimension_of` names the parallel dimension of an op by the `ParallelContext` group it ran on: ``tensor``,
``pipeline``, ``context`` (ring sends and all-to-alls of context-parallel attention), ``data_gradients``
(reductions over the data, zero1 or zero1 replica group) and ``data_params`` (gathers over them), or ``world``
for the default group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor

COLLECTIVES = (
    "all_reduce",
    "reduce_scatter_single",
    "reduce_scatter_tensor",
    "all_gather_single",
    "all_gather_into_tensor",
    "all_gather",
    "reduce_scatter",
    "broadcast",
    "all_to_all_single",
)
# isend / irecv stay unwrapped: `dist.P2POp` accepts only the original functions; their batch is recorded
POINT_TO_POINT = ("send", "recv", "batch_isend_irecv")
DIMENSIONS = ("tensor", "pipeline", "data_gradients", "data_params", "context")


@dataclass
class Op:
    """One recorded operation. ``peer`` is the global rank of a point-to-point op's other end (None for
    collectives); ``sent`` the bytes this rank sends (module docstring)."""

    kind: str
    group: Any
    group_size: int
    sent: float
    shape: Tuple[int, ...]
    dtype: torch.dtype
    peer: Optional[int] = None
    tag: int = 0
    storage: int = 0  # the tensor's storage pointer (tests tell buffers apart by it)
    dimension: str = ""  # set by `bytes_by_dimension`

    @property
    def is_p2p(self) -> bool:
        return self.kind in ("send", "recv", "isend", "irecv")

    def to_dict(self) -> Dict[str, Any]:
        """The op in ``--report``: kind, dimension, group size, bytes sent, peer, shape, dtype."""
        return {
            "kind": self.kind,
            "dimension": self.dimension,
            "group_size": self.group_size,
            "bytes": self.sent,
            "peer": self.peer,
            "shape": list(self.shape),
            "dtype": str(self.dtype).replace("torch.", ""),
        }


def _size(group: Any) -> int:
    return dist.get_world_size(group) if group is not None else dist.get_world_size()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _storage(t: torch.Tensor) -> int:
    if isinstance(t, FakeTensor):  # no data pointer: the storage object, kept alive as long as the storage
        return id(t.untyped_storage())
    return t.untyped_storage().data_ptr()


def describe_collective(name: str, args: tuple, kwargs: Dict[str, Any]) -> Op:
    """The `Op` of a call ``dist.<name>(*args, **kwargs)`` of a collective."""
    group = kwargs.get("group", args[2] if name == "broadcast" and len(args) > 2 else None)
    if name == "all_reduce" and group is None and len(args) > 2:
        group = args[2]
    size = _size(group)
    first = args[0] if args else kwargs.get("tensor", kwargs.get("output"))
    if name == "all_gather":  # list form: (outputs, input)
        tensor, full = args[1], sum(_nbytes(t) for t in first)
    elif name.startswith("all_gather"):  # (output, input): the full tensor is the output
        tensor, full = args[1], _nbytes(first)
    elif name == "all_to_all_single":  # (output, input): every rank sends all but its own piece of the input
        tensor, full = args[1], _nbytes(args[1])
    elif name.startswith("reduce_scatter"):  # (output, input): the full tensor is the input
        inputs = args[1]
        tensor = inputs if torch.is_tensor(inputs) else inputs[0]
        full = _nbytes(tensor) * (1 if torch.is_tensor(inputs) else size)
    else:  # all_reduce, broadcast
        tensor, full = first, _nbytes(first)
    factor = 2.0 if name == "all_reduce" else 1.0
    return Op(
        kind=name,
        group=group,
        group_size=size,
        sent=factor * (size - 1) / size * full,
        shape=tuple(tensor.shape),
        dtype=tensor.dtype,
        storage=_storage(tensor),
    )


def describe_p2p(kind: str, tensor: torch.Tensor, peer: int, group: Any, tag: int = 0) -> Op:
    """The `Op` of one send or receive of ``tensor`` to or from global rank ``peer``."""
    sending = kind in ("send", "isend")
    return Op(
        kind=kind,
        group=group,
        group_size=_size(group),
        sent=float(_nbytes(tensor)) if sending else 0.0,
        shape=tuple(tensor.shape),
        dtype=tensor.dtype,
        peer=peer,
        tag=tag,
        storage=_storage(tensor),
    )


def _p2p_args(name: str, args: tuple, kwargs: Dict[str, Any]) -> Tuple[torch.Tensor, int, Any, int]:
    peer_key = "dst" if name in ("send", "isend") else "src"
    tensor = args[0] if args else kwargs["tensor"]
    peer = args[1] if len(args) > 1 else kwargs.get(peer_key)
    group = args[2] if len(args) > 2 else kwargs.get("group")
    tag = args[3] if len(args) > 3 else kwargs.get("tag", 0)
    return tensor, peer, group, tag


class CommRecorder:
    """Records the torch.distributed operations issued while it is active; ``ops`` in call order.

    ``with CommRecorder() as rec:`` wraps and records; ``rec.active = False`` pauses recording (the wrappers
    stay) and ``restore()`` (or leaving the block) puts the original functions back."""

    def __init__(self, active: bool = True) -> None:
        self.ops: List[Op] = []
        self.active = active
        self._depth = 0
        self._originals: Dict[str, Any] = {}

    def __enter__(self) -> "CommRecorder":
        self.install()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def install(self) -> None:
        names = [n for n in COLLECTIVES + POINT_TO_POINT if hasattr(dist, n)]
        self._originals = {name: getattr(dist, name) for name in names}
        for name, fn in self._originals.items():
            setattr(dist, name, self._wrap(name, fn))

    def restore(self) -> None:
        for name, fn in self._originals.items():
            setattr(dist, name, fn)
        self._originals = {}

    def _record(self, name: str, args: tuple, kwargs: Dict[str, Any]) -> None:
        if name == "batch_isend_irecv":
            for p2p in args[0] if args else kwargs["p2p_op_list"]:
                kind = getattr(p2p.op, "__name__", str(p2p.op))
                self.ops.append(describe_p2p(kind, p2p.tensor, p2p.peer, p2p.group, p2p.tag))
        elif name in POINT_TO_POINT:
            tensor, peer, group, tag = _p2p_args(name, args, kwargs)
            self.ops.append(describe_p2p(name, tensor, peer, group, tag))
        else:
            self.ops.append(describe_collective(name, args, kwargs))

    def _wrap(self, name: str, fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if self.active and self._depth == 0:
                self._record(name, args, kwargs)
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        wrapped.__name__ = getattr(fn, "__name__", name)
        return wrapped


def dimension_of(op: Op, pc: Any) -> str:
    """The parallel dimension of ``op`` by the group of ``pc`` (a `ParallelContext`) it ran on (module docstring)."""
    if op.group is not None and op.group is pc.tp_group:
        return "tensor"
    if op.group is not None and op.group is pc.pp_group:
        return "pipeline"
    if op.group is not None and op.group is getattr(pc, "cp_group", None):
        return "context"
    data_groups = [g for g in (pc.dp_group, pc.zero1_group, pc.zero1_replica_group) if g is not None]
    if any(op.group is g for g in data_groups):
        return "data_params" if op.kind.startswith("all_gather") or op.kind == "broadcast" else "data_gradients"
    return "world"


def bytes_by_dimension(ops: List[Op], pc: Any) -> Dict[str, float]:
    """Bytes sent per dimension (`DIMENSIONS`, plus ``world`` when the default group was used); names each op's
    ``dimension``."""
    out = {d: 0.0 for d in DIMENSIONS}
    for op in ops:
        op.dimension = dim = dimension_of(op, pc)
        out[dim] = out.get(dim, 0.0) + op.sent
    return out


__all__ = [
    "Op",
    "CommRecorder",
    "DIMENSIONS",
    "describe_collective",
    "describe_p2p",
    "dimension_of",
    "bytes_by_dimension",
]
