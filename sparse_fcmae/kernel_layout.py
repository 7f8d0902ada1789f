"""MinkowskiEngine kernel layout <-> dense ``nn.Conv2d`` weight layout.

ME stores a 2-D kernel as ``(k*k, Cin, Cout)`` (``(k*k, C)`` for depthwise), offset index
``i0 + k*i1`` with the first spatial axis (height) fastest; a dense weight is ``(Cout, Cin, k, k)``
with ``W[:, :, a, b] = kernel[a + k*b].T``.
"""
from __future__ import annotations

import math

import torch


def _side(num_offsets: int) -> int:
    k = math.isqrt(num_offsets)
    if k * k != num_offsets:
        raise ValueError(f"kernel has {num_offsets} offsets, not a square number")
    return k


def conv_kernel_to_weight(kernel: torch.Tensor) -> torch.Tensor:
    """``(k*k, Cin, Cout)`` -> ``(Cout, Cin, k, k)``."""
    k = _side(kernel.shape[0])
    return kernel.reshape(k, k, kernel.shape[1], kernel.shape[2]).permute(3, 2, 1, 0)


def conv_weight_to_kernel(weight: torch.Tensor) -> torch.Tensor:
    """``(Cout, Cin, k, k)`` -> ``(k*k, Cin, Cout)``."""
    cout, cin, k, _ = weight.shape
    return weight.permute(3, 2, 1, 0).reshape(k * k, cin, cout)


def depthwise_kernel_to_weight(kernel: torch.Tensor) -> torch.Tensor:
    """``(k*k, C)`` -> ``(C, 1, k, k)``."""
    k = _side(kernel.shape[0])
    return kernel.reshape(k, k, kernel.shape[1]).permute(2, 1, 0).unsqueeze(1)


def depthwise_weight_to_kernel(weight: torch.Tensor) -> torch.Tensor:
    """``(C, 1, k, k)`` -> ``(k*k, C)``."""
    c, _, k, _ = weight.shape
    return weight.squeeze(1).permute(2, 1, 0).reshape(k * k, c)


def kernel_offsets(kernel_size: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(i0, i1)``, each ``(k*k,)`` int64: the grid offsets of kernel offset ``i0 + k*i1`` (ME's order)."""
    i = torch.arange(kernel_size, device=device)
    return i.repeat(kernel_size), i.repeat_interleave(kernel_size)


def gather_offsets(index: torch.Tensor, b: torch.Tensor, y: torch.Tensor, x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """``(N, k*k)`` table ``index[b, y + i0, x + i1]`` for every kernel offset, in ME's order.

    ``index (B, H, W)`` maps grid cells to rows (``-1``: none); ``(b, y, x)`` are the sites' cells,
    already shifted so that ``y + k - 1`` and ``x + k - 1`` stay inside ``index``.
    """
    i0, i1 = kernel_offsets(kernel_size, index.device)
    return index[b.unsqueeze(1), y.unsqueeze(1) + i0, x.unsqueeze(1) + i1]
