"""Sparse ConvNeXt V2 layers on MinkowskiEngine tensors.

Parameter names and shapes follow the official FCMAE checkpoint (``ln.weight``, ``kernel (k*k, C)``,
``gamma (1, C)``), so official checkpoints load without renaming.
"""
from __future__ import annotations

import math

import MinkowskiEngine as ME
import torch
from torch import nn

from .. import ops
from .neighbors import neighbor_tables, sample_segments
from .tensor import batch_index, with_features


class SparseLayerNorm(nn.Module):
    """LayerNorm over the channels of each site."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.ln = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        return with_features(x, self.ln(x.F))


class SparseGRN(nn.Module):
    """Global response normalisation, per sample over that sample's sites (not over the batch)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, dim))
        self.beta = nn.Parameter(torch.zeros(1, dim))
        self.eps = eps

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        batch, num_samples, segments = sample_segments(x)
        feats = ops.sparse_grn(x.F, batch, num_samples, self.gamma, self.beta, self.eps, segments=segments)
        return with_features(x, feats)


class SparseDepthwiseConv(nn.Module):
    """Depthwise submanifold convolution (output sites = input sites), odd kernel size."""

    def __init__(self, dim: int, kernel_size: int = 7, bias: bool = True):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.kernel_size = kernel_size
        self.kernel = nn.Parameter(torch.empty(kernel_size ** 2, dim))
        self.bias = nn.Parameter(torch.zeros(1, dim)) if bias else None
        nn.init.kaiming_uniform_(self.kernel, a=math.sqrt(5))

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        table, table_t = neighbor_tables(x, self.kernel_size)
        return with_features(x, ops.sparse_depthwise_conv(x.F, table, self.kernel, self.bias, table_t))


class SparseDropPath(nn.Module):
    """Stochastic depth: drops a whole sample's residual branch (scaled by 1/keep)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        batch = batch_index(x)
        num_samples = int(batch.max()) + 1 if batch.numel() else 0
        keep_prob = 1.0 - self.drop_prob
        keep = torch.empty(num_samples, 1, device=x.F.device, dtype=x.F.dtype).bernoulli_(keep_prob)
        return with_features(x, x.F * (keep / keep_prob)[batch])
