"""Per-coordinate-map caches derived from MinkowskiEngine's coordinate manager: neighbour tables
for submanifold convolutions (from ME's kernel maps) and the batch segments used by sparse GRN."""
from __future__ import annotations

import MinkowskiEngine as ME
import torch

from ..ops.depthwise import transpose_neighbors
from ..ops.grn import batch_segments

_CACHE_ATTR = "_sparse_fcmae_neighbors"


def _cache(x: ME.SparseTensor) -> dict:
    manager = x.coordinate_manager
    cache = getattr(manager, _CACHE_ATTR, None)
    if cache is None:
        cache = {}
        setattr(manager, _CACHE_ATTR, cache)
    return cache


def neighbor_tables(x: ME.SparseTensor, kernel_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(table, transposed)``, both ``(N, k*k)`` int32.

    ``table[i, j]`` is the input row at kernel offset ``j`` of output site ``i`` (same coordinates in
    and out), or ``-1`` where that site is not present; ``transposed[r, j] = i`` where
    ``table[i, j] = r`` (the map the input gradient gathers over). Offsets follow ME's order (first
    spatial axis fastest). All blocks of a stage share coordinates, so both are cached on the
    coordinate manager and built once per stage and batch.
    """
    cache = _cache(x)
    cache_key = ("nbr", str(x.coordinate_map_key), kernel_size)
    tables = cache.get(cache_key)
    if tables is None:
        n = x.F.shape[0]
        manager, key = x.coordinate_manager, x.coordinate_map_key
        maps = manager.kernel_map(key, key, stride=1, kernel_size=kernel_size, dilation=1)
        table = torch.full((n, kernel_size ** 2), -1, dtype=torch.int32, device=x.F.device)
        if maps:
            # one scatter for all offsets instead of one per offset
            ks = sorted(maps)
            in_idx = torch.cat([maps[k][0].long() for k in ks])
            out_idx = torch.cat([maps[k][1].long() for k in ks])
            cols = torch.cat([torch.full((maps[k].shape[1],), k, dtype=torch.long) for k in ks]).to(out_idx.device)
            table[out_idx, cols] = in_idx.to(torch.int32)
        tables = (table, transpose_neighbors(table))
        cache[cache_key] = tables
    return tables


def neighbor_table(x: ME.SparseTensor, kernel_size: int) -> torch.Tensor:
    """The ``(N, k*k)`` int32 neighbour table of :func:`neighbor_tables`."""
    return neighbor_tables(x, kernel_size)[0]


def sample_segments(x: ME.SparseTensor) -> tuple[torch.Tensor, int, tuple[torch.Tensor, torch.Tensor]]:
    """``(batch (N,) int64, num_samples, (perm, offsets))`` of ``x``'s rows, cached per coordinate map."""
    cache = _cache(x)
    cache_key = ("seg", str(x.coordinate_map_key))
    seg = cache.get(cache_key)
    if seg is None:
        batch = x.C[:, 0].long()
        num_samples = int(batch.max()) + 1 if batch.numel() else 0
        seg = (batch, num_samples, batch_segments(batch, num_samples))
        cache[cache_key] = seg
    return seg


def child_table(x: ME.SparseTensor, stride: int) -> tuple[ME.CoordinateMapKey, torch.Tensor]:
    """``(out_key, children)`` for a ``stride x stride`` downsampling of ``x``.

    ``out_key``: ME's strided coordinate map; ``children (N_out, stride**2)`` int64: the input row at
    kernel offset ``k`` (ME's order, first spatial axis fastest) of each output site, ``-1`` if absent.
    Taken from ME's kernel map between the two maps, cached like the neighbour tables.
    """
    cache = _cache(x)
    cache_key = ("children", str(x.coordinate_map_key), stride)
    entry = cache.get(cache_key)
    if entry is None:
        manager, key = x.coordinate_manager, x.coordinate_map_key
        out_key = manager.stride(key, [stride] * (x.C.shape[1] - 1))
        maps = manager.kernel_map(key, out_key, stride=stride, kernel_size=stride)
        children = torch.full((manager.size(out_key), stride ** 2), -1, dtype=torch.long, device=x.F.device)
        for k, in_out in maps.items():
            children[in_out[1].long(), k] = in_out[0].long()
        entry = (out_key, children)
        cache[cache_key] = entry
    return entry
