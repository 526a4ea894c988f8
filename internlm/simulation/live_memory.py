"""The peak of live tensor storages over a stretch of code, on real CPU tensors or on fake ones.

`LiveStorages` is a `TorchDispatchMode`: every tensor an op returns is looked at, and a storage not seen before
is counted (its ``nbytes``) until its Python storage object, which torch keeps alive exactly as long as the
storage, is finalised. Storages shared by views count once; a storage resized in place is recounted. With
`FakeTensorMode` underneath, the storages are the fake tensors' meta storages: the same sizes, no memory.
Tensors made before the mode was entered are not counted (build the model and the optimizer inside it).
"""

from __future__ import annotations

import weakref
from typing import Any, Dict, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveStorages(TorchDispatchMode):
    """``current``: bytes of the live storages created under the mode; ``peak``: their maximum since the last
    `reset_peak`."""

    def __init__(self) -> None:
        super().__init__()
        self.live: Dict[int, Tuple[weakref.ref, int]] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        _, nbytes = self.live.pop(key)
        self.current -= nbytes

    def _see(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        nbytes = storage.nbytes()
        if key in self.live:
            ref, old = self.live[key]
            if old == nbytes:
                return
            self.live[key] = (ref, nbytes)  # resized in place
            self.current += nbytes - old
        else:
            self.live[key] = (weakref.ref(storage, lambda _, k=key: self._free(k)), nbytes)
            self.current += nbytes
        self.peak = max(self.peak, self.current)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor) and item.device.type != "meta":
                self._see(item)
        return out


__all__ = ["LiveStorages"]
