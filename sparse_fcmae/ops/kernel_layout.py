"""MinkowskiEngine kernel layout <-> dense ``nn.Conv2d`` / ``nn.Conv3d`` weight layout.

ME stores a D-dimensional kernel as ``(k**D, Cin, Cout)`` (``(k**D, C)`` for depthwise), offset index
``i0 + k*i1 + k*k*i2 ...`` with the first spatial axis fastest; a dense weight is
``(Cout, Cin, k, ..., k)`` with ``W[:, :, a, b] = kernel[a + k*b].T`` (2D) and
``W[:, :, a, b, c] = kernel[a + k*b + k*k*c].T`` (3D).
"""
from __future__ import annotations

import torch


def _side(num_offsets: int, spatial_dims: int) -> int:
    k = round(num_offsets ** (1.0 / spatial_dims))
    if k ** spatial_dims != num_offsets:
        raise ValueError(f"kernel has {num_offsets} offsets, not a {spatial_dims}-D cube of a side")
    return k


def _reversed_axes(spatial_dims: int) -> tuple[int, ...]:
    # a (k, ..., k) view of ME's offsets has the LAST spatial axis first (the first one is fastest)
    return tuple(range(spatial_dims - 1, -1, -1))


def conv_kernel_to_weight(kernel: torch.Tensor, spatial_dims: int = 2) -> torch.Tensor:
    """``(k**D, Cin, Cout)`` -> ``(Cout, Cin, k, ..., k)``."""
    k = _side(kernel.shape[0], spatial_dims)
    d = spatial_dims
    w = kernel.reshape(*([k] * d), kernel.shape[1], kernel.shape[2])
    return w.permute(d + 1, d, *_reversed_axes(d))


def conv_weight_to_kernel(weight: torch.Tensor) -> torch.Tensor:
    """``(Cout, Cin, k, ..., k)`` -> ``(k**D, Cin, Cout)``; ``D = weight.ndim - 2``."""
    cout, cin, k = weight.shape[0], weight.shape[1], weight.shape[2]
    d = weight.ndim - 2
    return weight.permute(*(2 + a for a in _reversed_axes(d)), 1, 0).reshape(k ** d, cin, cout)


def depthwise_kernel_to_weight(kernel: torch.Tensor, spatial_dims: int = 2) -> torch.Tensor:
    """``(k**D, C)`` -> ``(C, 1, k, ..., k)``."""
    k = _side(kernel.shape[0], spatial_dims)
    d = spatial_dims
    return kernel.reshape(*([k] * d), kernel.shape[1]).permute(d, *_reversed_axes(d)).unsqueeze(1)


def depthwise_weight_to_kernel(weight: torch.Tensor) -> torch.Tensor:
    """``(C, 1, k, ..., k)`` -> ``(k**D, C)``; ``D = weight.ndim - 2``."""
    c, k, d = weight.shape[0], weight.shape[2], weight.ndim - 2
    return weight.squeeze(1).permute(*(1 + a for a in _reversed_axes(d)), 0).reshape(k ** d, c)


def kernel_offsets(kernel_size: int, spatial_dims: int = 2, device=None) -> tuple[torch.Tensor, ...]:
    """``(i0, i1[, i2])``, each ``(k**D,)`` int64: the grid offsets of kernel offset ``i0 + k*i1 + k*k*i2``
    (ME's order, first spatial axis fastest)."""
    i = torch.arange(kernel_size, device=device)
    return tuple(
        i.repeat_interleave(kernel_size ** a).repeat(kernel_size ** (spatial_dims - 1 - a)) for a in range(spatial_dims)
    )


def gather_offsets(index: torch.Tensor, b: torch.Tensor, pos: tuple[torch.Tensor, ...], kernel_size: int) -> torch.Tensor:
    """``(N, k**D)`` table ``index[b, p0 + i0, p1 + i1, ...]`` for every kernel offset, in ME's order.

    ``index (B, *S)`` maps grid cells to rows (``-1``: none); ``pos`` (one ``(N,)`` tensor per spatial
    axis) are the sites' cells, already shifted so that ``p + k - 1`` stays inside ``index``.
    One gather at flat positions ``base[n] + delta[j]``: about half the time of indexing with one
    ``(N, k**D)`` tensor per axis (measured on CPU, 2D and 3D), and one such tensor in memory, not D + 1.
    """
    index = index.contiguous()
    strides = index.stride()
    base = b * strides[0]
    for p, s in zip(pos, strides[1:]):
        base = base + p * s
    offsets = kernel_offsets(kernel_size, len(pos), index.device)
    delta = sum(o * s for o, s in zip(offsets, strides[1:]))
    return index.reshape(-1)[base.unsqueeze(1) + delta]


def grid_neighbor_table(mask_map: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Neighbour table of the visible sites of ``mask_map (B, H, W)`` or ``(B, D, H, W)`` (1 = masked) in
    MinkowskiEngine's offset order, rows batch-major like ``to_sparse``. Pure torch: the kernel benchmarks
    and kernel tests run without MinkowskiEngine; tests check it against ME's table where ME is installed."""
    r = kernel_size // 2
    vis = mask_map < 0.5
    coords = torch.nonzero(vis)
    index = torch.full((mask_map.shape[0], *(s + 2 * r for s in mask_map.shape[1:])), -1, dtype=torch.int32,
                       device=mask_map.device)
    inner = (slice(None),) + tuple(slice(r, r + s) for s in mask_map.shape[1:])
    index[inner][vis] = torch.arange(coords.shape[0], dtype=torch.int32, device=mask_map.device)
    return gather_offsets(index, coords[:, 0], tuple(coords[:, 1:].unbind(1)), kernel_size).contiguous()
