"""Depthwise (channel-wise) submanifold convolution over a neighbour table."""
from __future__ import annotations

import torch


def sparse_depthwise_conv_reference(
    feats: torch.Tensor, neighbors: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``out[i, c] = bias[c] + sum_k feats[neighbors[i, k], c] * kernel[k, c]``.

    ``feats (N, C)``; ``neighbors (N, K)`` int64, ``-1`` where the neighbour at kernel offset ``k``
    is absent (outside the visible set); ``kernel (K, C)`` in MinkowskiEngine's offset order.
    """
    n, c = feats.shape
    padded = torch.cat([feats, feats.new_zeros(1, c)])  # row n is the "absent" neighbour
    idx = torch.where(neighbors < 0, torch.full_like(neighbors, n), neighbors)
    out = feats.new_zeros(n, c) if bias is None else bias.reshape(1, c).expand(n, c).clone()
    for k in range(neighbors.shape[1]):
        out = out + padded.index_select(0, idx[:, k]) * kernel[k]
    return out


def sparse_depthwise_conv(feats, neighbors, kernel, bias):
    """Sparse depthwise conv; uses the compiled kernel when available."""
    return sparse_depthwise_conv_reference(feats, neighbors, kernel, bias)
