"""`TPShard`: how one parameter is placed over the tensor-parallel group, the one record every consumer reads.

For a parameter whose full (single-device) tensor ``f`` has ``global_shape`` and a tensor group of ``size``
ranks:

* split along ``dim``: rank ``r`` holds ``f.narrow(dim, r * n, n)`` with ``n = global_shape[dim] / size``
  (chunk ``r`` of ``size`` equal chunks), so ``join`` is the concatenation of the ranks' pieces along ``dim``;
* replicated (``dim`` None): every rank holds all of ``f``. With ``size > 1`` it is a *duplicate* (its gradient
  norm is counted once, on tensor rank 0); with ``partial_grad`` each rank's gradient is only a part of the
  true one (sequence-parallel norms, replicated k/v) and is summed over the tensor group before the update.

Tensor-parallel layers declare the records of their own parameters in a ``tp_shards`` dict (parameter name ->
`TPShard`), a plain module attribute that survives ``to_empty`` and ``.to``. `param_shards` collects them for a
whole model under full parameter names; a parameter no layer declares is not tensor-parallel. Initialisation
(`InternLM.init_weights`), the optimizer's flat buffers and state files, checkpoint merge and resharding all
read these records; checkpoints store ``to_record()``, ``(dim, rank, size)`` or None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn


@dataclass(frozen=True)
class TPShard:
    """Placement of one parameter over a tensor group; see the module docstring for the formulas."""

    global_shape: Tuple[int, ...]
    dim: Optional[int] = None
    rank: int = 0
    size: int = 1
    partial_grad: bool = False

    @classmethod
    def split(cls, global_shape: Sequence[int], dim: int, rank: int, size: int) -> "TPShard":
        """Chunk ``rank`` of ``size`` along ``dim``; raises ValueError when ``size`` does not divide that dim."""
        shape = tuple(int(s) for s in global_shape)
        if shape[dim] % size:
            raise ValueError(f"dimension {dim} of shape {list(shape)} does not split into {size} tensor shards")
        return cls(shape, dim, rank, size)

    @classmethod
    def replicated(
        cls, global_shape: Sequence[int], rank: int = 0, size: int = 1, partial_grad: bool = False
    ) -> "TPShard":
        """The whole tensor on each of ``size`` ranks."""
        return cls(tuple(int(s) for s in global_shape), None, rank, size, partial_grad)

    @classmethod
    def from_record(cls, local_shape: Sequence[int], record: Optional[Sequence[int]]) -> "TPShard":
        """Inverse of `to_record` for a tensor of ``local_shape`` (what checkpoints store)."""
        if record is None:
            return cls.replicated(local_shape)
        dim, rank, size = (int(v) for v in record)
        shape = list(local_shape)
        shape[dim] *= size
        return cls(tuple(shape), dim, rank, size)

    # ------------------------------------------------------------------ properties
    @property
    def is_split(self) -> bool:
        return self.dim is not None and self.size > 1

    @property
    def duplicate(self) -> bool:
        """The same values live on every rank of a tensor group larger than one."""
        return self.dim is None and self.size > 1

    @property
    def local_shape(self) -> Tuple[int, ...]:
        if not self.is_split:
            return self.global_shape
        shape = list(self.global_shape)
        shape[self.dim] //= self.size
        return tuple(shape)

    def to_record(self) -> Optional[Tuple[int, int, int]]:
        """``(dim, rank, size)`` for a split tensor, None for a replicated one (the checkpoint format)."""
        return (self.dim, self.rank, self.size) if self.is_split else None

    # ------------------------------------------------------------------ values
    def slice(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's piece of ``full`` (a view; the whole tensor when replicated).

        Raises ValueError when ``full`` does not have ``global_shape``.
        """
        if tuple(full.shape) != self.global_shape:
            raise ValueError(f"expected a tensor of the full shape {list(self.global_shape)}, got {list(full.shape)}")
        if not self.is_split:
            return full
        local = self.global_shape[self.dim] // self.size
        return full.narrow(self.dim, self.rank * local, local)

    def join(self, pieces: Sequence[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every rank's piece, in rank order (the first piece when replicated)."""
        if not self.is_split:
            return pieces[0]
        if len(pieces) != self.size:
            raise ValueError(f"{len(pieces)} pieces for a tensor split over {self.size} ranks")
        out = torch.cat(list(pieces), dim=self.dim)
        if tuple(out.shape) != self.global_shape:
            raise ValueError(f"joined shape {list(out.shape)} is not the full shape {list(self.global_shape)}")
        return out


def declare_shards(module: nn.Module, **shards: TPShard) -> None:
    """Record the placement of ``module``'s own parameters (``declare_shards(layer, weight=..., bias=...)``)."""
    table = module.__dict__.setdefault("tp_shards", {})
    table.update(shards)


def param_shards(model: nn.Module) -> Dict[str, TPShard]:
    """`TPShard` of every parameter of ``model`` under its full name (replicated, size 1, where none is declared)."""
    out: Dict[str, TPShard] = {}
    seen = set()
    for prefix, module in model.named_modules():
        table = module.__dict__.get("tp_shards", {})
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            shard = table.get(name)
            out[f"{prefix}.{name}" if prefix else name] = shard or TPShard.replicated(param.shape)
    return out


__all__ = ["TPShard", "declare_shards", "param_shards"]
