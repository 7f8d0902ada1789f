"""Per-coordinate-map caches derived from MinkowskiEngine's coordinate manager: neighbour tables
for submanifold convolutions, child tables for downsampling (both equal to ME's kernel maps, built
without them) and the batch segments used by sparse GRN. They are right by construction (an index map
holding 0..N-1 or -1; a stable sort of the rows' samples) and not checked: a check would cost a host sync per
stage on GPU, and the kernels read nothing out of bounds anyway (sparse_fcmae/ops/checks.py)."""
from __future__ import annotations

import MinkowskiEngine as ME
import torch

from ..ops.grn import batch_segments
from .sites import Sites, child_rows, corner_rows, index_map, neighbor_rows

_CACHE_ATTR = "_sparse_fcmae_neighbors"


def _cache(x: ME.SparseTensor) -> dict:
    manager = x.coordinate_manager
    cache = getattr(manager, _CACHE_ATTR, None)
    if cache is None:
        cache = {}
        setattr(manager, _CACHE_ATTR, cache)
    return cache


def remember_grid(x: ME.SparseTensor, batch: int, *spatial: int, patch: int | None = None) -> None:
    """Record the dense extent (``batch``, ``spatial`` sites per axis at tensor stride 1) behind ``x``'s
    coordinate manager, so the tables below need no device-to-host synchronisation; and ``patch``, the side
    (at stride 1) of the aligned cells the sites come in whole (see :func:`child_table`), if they do."""
    cache = _cache(x)
    cache["grid"] = (int(batch), *(int(s) for s in spatial))
    cache["patch"] = None if patch is None else int(patch)


def _grid(x: ME.SparseTensor) -> tuple[int, ...]:
    """``(B, *S)`` at stride 1: as recorded by :func:`to_sparse`, else from the coordinates (one sync)."""
    grid = _cache(x).get("grid")
    if grid is None:
        top = x.C.max(0).values.tolist() if x.C.shape[0] else [-1] + [0] * x.D
        grid = (top[0] + 1, *(t + s for t, s in zip(top[1:], x.tensor_stride)))
    return grid


def _index_map(x: ME.SparseTensor, pad: int) -> tuple[int, torch.Tensor, Sites]:
    """``(p, index, sites)`` with ``p >= pad``: ``sites`` the rows of ``x`` on its grid (at ``x``'s tensor
    stride), ``index = index_map(sites, p)``.
    Cached per coordinate map: the stage's neighbour table and its downsampling's child table read the
    same map."""
    cache = _cache(x)
    cache_key = ("index", str(x.coordinate_map_key))
    entry = cache.get(cache_key)
    if entry is None or entry[0] < pad:
        entry = _build_index_map(x, pad)
        cache[cache_key] = entry
    return entry


def _build_index_map(x: ME.SparseTensor, pad: int) -> tuple[int, torch.Tensor, Sites]:
    coords = x.C.long()
    stride = x.tensor_stride
    batch, *extent = _grid(x)
    sites = Sites(coords[:, 0], tuple(coords[:, 1 + a] // s for a, s in enumerate(stride)),
                  (batch, *(-(-e // s) for e, s in zip(extent, stride))))
    return pad, index_map(sites, pad), sites


def neighbor_table(x: ME.SparseTensor, kernel_size: int) -> torch.Tensor:
    """The ``(N, k**D)`` int32 neighbour table of ``x``'s sites.

    ``table[i, j]`` is the input row at kernel offset ``j`` of output site ``i`` (same coordinates in
    and out), or ``-1`` where that site is not present. Offsets follow ME's order (first spatial axis
    fastest), so the table equals the one from ME's kernel map (tested). It is read off a dense index map
    in a few device ops: ME's kernel map costs one host round trip and one tensor per offset, which
    dominated a GPU training step. All blocks of a stage share coordinates, so it is cached on the
    coordinate manager and built once per stage and batch. The kernel is centred and odd, so the table is
    symmetric (offset ``j`` takes ``i`` to ``r`` exactly when offset ``K-1-j`` takes ``r`` to ``i``): the
    depthwise backward reverses the taps over this table (``symmetric=True``) instead of keeping a transpose.
    """
    if kernel_size < 1 or kernel_size % 2 != 1:  # symmetric (see above) only for centred odd kernels
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    cache = _cache(x)
    cache_key = ("nbr", str(x.coordinate_map_key), kernel_size)
    table = cache.get(cache_key)
    if table is None:
        pad, index, sites = _index_map(x, kernel_size // 2)  # the map may be padded more than this kernel needs
        table = neighbor_rows(sites, index, pad, kernel_size)
        cache[cache_key] = table
    return table


def sample_segments(x: ME.SparseTensor) -> tuple[torch.Tensor, int, tuple[torch.Tensor, torch.Tensor]]:
    """``(batch (N,) int64, num_samples, (perm, offsets))`` of ``x``'s rows, cached per coordinate map."""
    cache = _cache(x)
    cache_key = ("seg", str(x.coordinate_map_key))
    seg = cache.get(cache_key)
    if seg is None:
        # the rows' sample index, from the stage's (cached) index map; contiguous once here, not per GRN call
        batch = _index_map(x, 0)[2].b.contiguous()
        num_samples = _grid(x)[0]  # recorded: no sync, and a fully masked last sample still counts
        seg = (batch, num_samples, batch_segments(batch, num_samples))
        cache[cache_key] = seg
    return seg


def child_table(x: ME.SparseTensor, stride: int) -> tuple[ME.CoordinateMapKey, torch.Tensor]:
    """``(out_key, children)`` for a ``stride**D`` downsampling of ``x`` (kernel = stride per axis).

    ``out_key``: the strided coordinate map, its rows in sample-then-raster order (ME's own strided map,
    ``manager.stride``, comes out in hash order: at stage 2 a neighbour row was a median 680 rows away,
    against 34 at stage 1, and the kernels' gathers lose their locality); ``children (N_out, stride**D)``
    int64: the input row at kernel offset ``k`` (ME's order, first spatial axis fastest) of each output
    site, ``-1`` if absent. Read off the dense index map of ``x`` (equal to ME's kernel map, tested),
    cached like the tables.
    """
    cache = _cache(x)
    cache_key = ("children", str(x.coordinate_map_key), stride)
    entry = cache.get(cache_key)
    if entry is None:
        manager = x.coordinate_manager
        pad, index, sites = _index_map(x, stride - 1)
        out_stride = [t * stride for t in x.tensor_stride]
        patch = cache.get("patch")
        if patch is not None and all(patch % t == 0 for t in out_stride):
            # every output cell lies inside one visible patch, so all stride**D of its sites are present: the
            # cells are the sites at their first corner, in the rows' (sample-then-raster) order. A fixed-size
            # nonzero: no sort and no host sync (the count is the rows' over stride**D), ~25 fewer ops.
            coords = x.C[corner_rows(sites, stride)].int()
        else:
            # the occupied strided cells, sorted by (sample, first axis, ...): one linear key per site
            sizes = index.shape[1:]
            lin = sites.b
            for p, n in zip(sites.pos, sizes):
                lin = lin * n + p // stride
            cells = torch.unique(lin)
            out_pos = []
            for n in reversed(sizes):
                out_pos.append(cells % n)
                cells = cells // n
            out_pos.reverse()
            coords = torch.stack([cells, *(q * t for q, t in zip(out_pos, out_stride))], 1).int()
        out_key, _ = manager.insert_and_map(coords, out_stride, "raster")
        out = manager.get_coordinates(out_key).long()  # the map's own row order (equal to ``coords`` on CPU)
        out_pos = tuple(out[:, 1 + a] // s for a, s in enumerate(out_stride))
        children = child_rows(sites, index, pad, out[:, 0], out_pos, stride)
        entry = (out_key, children)
        cache[cache_key] = entry
    return entry
