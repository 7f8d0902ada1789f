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
