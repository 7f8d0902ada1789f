"""A stage's sites as plain tensors, and the tables read off them: the dense index map, neighbour tables,
child tables of the downsampling and the samples' row segments.

The MinkowskiEngine path (``neighbors.py``) and the graph path of the encoder (``SparseConvNeXtV2`` with
``graph=True``) share these functions. Given the visible count (fixed at a fixed mask ratio) every shape
here is static and no op needs the host: ``nonzero_static`` instead of ``nonzero``/``unique``, index maps
instead of hashing. So the whole encoder traces into one ``torch.compile`` graph, which CUDA graphs can
replay.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..ops.kernel_layout import gather_offsets


class Sites(NamedTuple):
    """Rows of one stage: ``b (N,)`` sample and ``pos`` (one ``(N,)`` int64 per spatial axis) grid cell of
    every row, on the stage's grid ``grid = (B, *S)``. Rows are sample-major, raster within a sample."""

    b: torch.Tensor
    pos: tuple[torch.Tensor, ...]
    grid: tuple[int, ...]


def visible_sites(mask: torch.Tensor, grid: tuple[int, ...], scale: int, num_visible: int) -> Sites:
    """The visible sites of a patch mask ``(B, prod(grid))`` (1 = masked) upsampled ``scale`` times, with
    ``num_visible`` visible patches in every sample: ``B * num_visible * scale**D`` rows in the order of
    ``torch.nonzero`` (as ``to_sparse``), found by ``nonzero_static`` (no host sync)."""
    from ..masking import upsample_mask

    vis = upsample_mask(mask, grid, scale) < 0.5
    n = mask.shape[0] * num_visible * scale ** len(grid)
    coords = torch.nonzero_static(vis, size=n)
    return Sites(coords[:, 0].contiguous(), tuple(coords[:, 1:].unbind(1)), tuple(vis.shape))


def check_visible_count(mask: torch.Tensor, num_visible: int) -> None:
    """One clear error unless every sample of the patch mask ``(B, L)`` has ``num_visible`` visible patches
    (what the static shapes of the graph path assume). Reads the mask: call it where the mask is on the host."""
    counts = (mask < 0.5).sum(1)
    if mask.shape[0] and not bool((counts == num_visible).all()):
        raise ValueError(f"the graph path needs {num_visible} visible patches in every sample (the mask ratio's), "
                         f"the mask has {sorted(set(counts.tolist()))}")


def index_map(sites: Sites, pad: int) -> torch.Tensor:
    """``(B, *(S + 2 pad))`` int32: the row of the site at each cell, shifted by ``pad``; ``-1`` where none."""
    batch, *sizes = sites.grid
    index = torch.full((batch, *(s + 2 * pad for s in sizes)), -1, dtype=torch.int32, device=sites.b.device)
    rows = torch.arange(sites.b.shape[0], dtype=torch.int32, device=sites.b.device)
    index[(sites.b,) + tuple(p + pad for p in sites.pos)] = rows
    return index


def neighbor_rows(sites: Sites, index: torch.Tensor, pad: int, kernel_size: int) -> torch.Tensor:
    """``(N, k**D)`` int32 neighbour table of a centred odd kernel, from ``index_map(sites, pad)``
    (``pad >= k // 2``); offsets in MinkowskiEngine's order, ``-1`` where no site."""
    shift = pad - kernel_size // 2
    return gather_offsets(index, sites.b, tuple(p + shift for p in sites.pos), kernel_size).contiguous()


def corner_rows(sites: Sites, stride: int) -> torch.Tensor:
    """Rows at the first corner of their ``stride**D`` cell, in row order, when the sites come in whole
    aligned cells (patches of the mask): ``N / stride**D`` of them, by ``nonzero_static`` (no sort, no sync)."""
    corner = sites.pos[0] % stride == 0
    for p in sites.pos[1:]:
        corner = corner & (p % stride == 0)
    return torch.nonzero_static(corner, size=sites.b.shape[0] // stride ** len(sites.pos)).squeeze(1)


def child_rows(sites: Sites, index: torch.Tensor, pad: int, out_b: torch.Tensor,
               out_pos: tuple[torch.Tensor, ...], stride: int) -> torch.Tensor:
    """``(N_out, stride**D)`` int64: the row of ``sites`` at kernel offset ``k`` (ME's order) of each output
    cell ``out_pos`` (on the strided grid), ``-1`` if absent; ``index = index_map(sites, pad)``."""
    return gather_offsets(index, out_b, tuple(p * stride + pad for p in out_pos), stride).long()


def downsampled(sites: Sites, rows: torch.Tensor, stride: int) -> Sites:
    """The strided stage whose cells are the corner rows ``rows`` of ``sites``."""
    batch, *sizes = sites.grid
    return Sites(sites.b[rows], tuple(p[rows] // stride for p in sites.pos),
                 (batch, *(-(-s // stride) for s in sizes)))


def sorted_segments(b: torch.Tensor, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm, offsets)`` (as ``ops.grn.batch_segments``) of sample-major rows: ``perm`` is the identity."""
    perm = torch.arange(b.shape[0], dtype=torch.long, device=b.device)
    bounds = torch.arange(num_samples + 1, dtype=torch.long, device=b.device)
    return perm, torch.searchsorted(b, bounds)
