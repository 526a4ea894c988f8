"""The initial weights of `InternLM`, the same for every parallel layout.

InternLM's distribution: normal(0, std) for weights (``std = config.init_std``), normal(0, std / sqrt(2 L)) for the
projections that write into the residual stream (``o_proj``, ``down_proj``; L = num_layers, so the residual's
variance stays about std^2 whatever the depth), ones for norms, zeros for biases.

Why tiles: a run must start from the same weights whichever tensor / pipeline layout it uses (the equivalence tests
compare per-step losses across layouts, and a resumed run may change layout), and a rank must pay for the pieces it
holds only. So the values are a function of (seed, parameter name, position in the *full* tensor), never of the
shard or of the drawing order. A weight's full tensor is cut into fixed tiles (`init_tile_shape`, a function of the
full shape only); tile ``i`` is drawn from its own CPU generator seeded by

    seed(tile) = first 8 bytes of sha256("{seed}/{name}/{i_0},{i_1}") read little-endian, >> 1   (a 63-bit seed)

A rank holding rows [a, b) of a split dimension draws only the tiles that range touches and copies the covered part.
Along each dimension of size S the tensor has g tiles of S / g, g the largest power of two <= 16 dividing S with
tiles of at least 16 values: the pieces of a power-of-two tensor split up to 16 then cover whole tiles (e.g. 640 x
640 tiles for hidden 10240), so sharded initialisation draws nothing it discards for the shipped shapes; other
splits draw the few tiles they cut.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from typing import Any, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

MAX_TILES = 16  # tiles per dimension, at most (a power of two)
MIN_TILE = 16  # values per tile along a dimension, at least

OUTPUT_PROJECTIONS = ("o_proj.weight", "down_proj.weight")  # write into the residual stream: std / sqrt(2 L)


@torch.no_grad()
def init_weights(
    model: nn.Module, init_std: float, num_layers: int, seed: int = 0, shards: Optional[Mapping[str, Any]] = None
) -> int:
    """Initialise every parameter of ``model`` in place (see the module docstring); returns the number of random
    values drawn (the work done: proportional to the parameters this process holds).

    ``shards`` maps a parameter name to its placement when the model is a tensor-parallel shard
    (`internlm.parallel.param_shards`; any object with ``global_shape`` and, when split, ``dim``/``rank``/``size``/
    ``is_split``): the parameter draws only the tiles its piece covers, so every layout starts from exactly the
    single-device weights.
    """
    shards = shards or {}
    out_std = init_std / math.sqrt(2.0 * num_layers)
    drawn = 0
    for name, param in model.named_parameters():
        shard = shards.get(name)
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            full_shape = tuple(shard.global_shape) if shard is not None else tuple(param.shape)
            region = [(0, n) for n in full_shape]
            if shard is not None and getattr(shard, "is_split", False):
                local = full_shape[shard.dim] // shard.size
                region[shard.dim] = (shard.rank * local, (shard.rank + 1) * local)
            if tuple(hi - lo for lo, hi in region) != tuple(param.shape):
                raise ValueError(f"{name}: shape {list(param.shape)} is not its piece {region} of {full_shape}")
            scale = out_std if name.endswith(OUTPUT_PROJECTIONS) else init_std
            drawn += tiled_normal_(param, full_shape, region, (seed, name), scale)
    return drawn


def init_tile_shape(full_shape: Sequence[int]) -> Tuple[int, ...]:
    """The tile shape of the block-wise initialisation of a tensor of ``full_shape`` (layout independent)."""
    tile = []
    for size in full_shape:
        g = 1
        while 2 * g <= MAX_TILES and size % (2 * g) == 0 and size // (2 * g) >= MIN_TILE:
            g *= 2
        tile.append(size // g)
    return tuple(tile)


def _tile_seed(key: Tuple[int, str], index: Tuple[int, ...]) -> int:
    text = f"{key[0]}/{key[1]}/{','.join(map(str, index))}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def tiled_normal_(
    out: torch.Tensor,
    full_shape: Sequence[int],
    region: Sequence[Tuple[int, int]],
    key: Tuple[int, str],
    std: float,
) -> int:
    """Fill ``out`` with the piece ``region`` (``[(start, stop)]`` per dimension) of a normal(0, std) tensor of
    ``full_shape`` whose tiles (`init_tile_shape`) are drawn from generators seeded by (``key``, tile index).
    Draws only the tiles the region touches; returns the number of values drawn."""
    tile = init_tile_shape(full_shape)
    spans = [range(lo // t, (hi - 1) // t + 1) if hi > lo else range(0) for (lo, hi), t in zip(region, tile)]
    drawn = 0
    for index in itertools.product(*spans):
        starts = [i * t for i, t in zip(index, tile)]
        gen = torch.Generator().manual_seed(_tile_seed(key, index))
        block = torch.empty(tile).normal_(0.0, std, generator=gen)
        drawn += block.numel()
        src = tuple(slice(max(lo, a) - a, min(hi, a + t) - a) for (lo, hi), a, t in zip(region, starts, tile))
        dst = tuple(slice(max(lo, a) - lo, min(hi, a + t) - lo) for (lo, hi), a, t in zip(region, starts, tile))
        out[dst].copy_(block[src])
    return drawn


__all__ = ["init_tile_shape", "init_weights", "tiled_normal_"]
