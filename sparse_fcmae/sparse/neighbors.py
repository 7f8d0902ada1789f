"""Neighbour tables for submanifold convolutions, from MinkowskiEngine's kernel maps."""
from __future__ import annotations

import MinkowskiEngine as ME
import torch

_CACHE_ATTR = "_sparse_fcmae_neighbors"


def neighbor_table(x: ME.SparseTensor, kernel_size: int) -> torch.Tensor:
    """``(N, k*k)`` int64 table: row ``i``, column ``j`` is the input row at kernel offset ``j`` of
    output site ``i`` (same coordinates in and out), or ``-1`` where that site is not present.

    Offsets follow ME's order (first spatial axis fastest). All blocks of a stage share coordinates,
    so the table is cached on the coordinate manager and built once per stage and batch.
    """
    manager = x.coordinate_manager
    key = x.coordinate_map_key
    cache = getattr(manager, _CACHE_ATTR, None)
    if cache is None:
        cache = {}
        setattr(manager, _CACHE_ATTR, cache)
    cache_key = (str(key), kernel_size)
    table = cache.get(cache_key)
    if table is None:
        n = x.F.shape[0]
        maps = manager.kernel_map(key, key, stride=1, kernel_size=kernel_size, dilation=1)
        table = torch.full((n, kernel_size ** 2), -1, dtype=torch.long, device=x.F.device)
        for k, in_out in maps.items():
            in_out = in_out.long()
            table[in_out[1], k] = in_out[0]
        cache[cache_key] = table
    return table
