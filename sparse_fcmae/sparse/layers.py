"""Sparse ConvNeXt V2 layers on MinkowskiEngine tensors.

Parameter names and shapes follow the official FCMAE checkpoint (``ln.weight``, ``kernel (k*k, C)``,
``gamma (1, C)``), so official checkpoints load without renaming. Volumes (``spatial_dims=3``) use the same
layers with ``k**3`` kernel offsets.
"""
from __future__ import annotations

import math

import MinkowskiEngine as ME
import torch
from torch import nn

from .. import ops
from .neighbors import child_table, neighbor_table, sample_segments
from .tensor import with_features


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
        # cached segments, right by construction (neighbors.py): no per-call check
        feats = ops.sparse_grn(x.F, batch, num_samples, self.gamma, self.beta, self.eps, segments=segments,
                               validate=False)
        return with_features(x, feats)


class SparseDepthwiseConv(nn.Module):
    """Depthwise submanifold convolution (output sites = input sites), odd kernel size;
    ``kernel (k**D, C)`` in ME's offset order."""

    def __init__(self, dim: int, kernel_size: int = 7, bias: bool = True, spatial_dims: int = 2):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.kernel_size = kernel_size
        self.kernel = nn.Parameter(torch.empty(kernel_size ** spatial_dims, dim))
        self.bias = nn.Parameter(torch.zeros(1, dim)) if bias else None
        nn.init.kaiming_uniform_(self.kernel, a=math.sqrt(5))

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        table = neighbor_table(x, self.kernel_size)  # cached, right by construction (neighbors.py): no check
        return with_features(x, ops.sparse_depthwise_conv(x.F, table, self.kernel, self.bias, symmetric=True,
                                                          validate=False))


class SparseDropPath(nn.Module):
    """Stochastic depth: drops a whole sample's residual branch (scaled by 1/keep)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        batch, num_samples, _ = sample_segments(x)  # cached per stage, shared with GRN
        keep_prob = 1.0 - self.drop_prob
        keep = torch.empty(num_samples, 1, device=x.F.device, dtype=x.F.dtype).bernoulli_(keep_prob)
        return with_features(x, x.F * (keep / keep_prob)[batch])


class SparseDownsample(nn.Module):
    """``stride**D`` convolution with stride ``stride`` (ConvNeXt's 2x2 or 2x2x2 downsampling).

    Parameters keep ME's convolution layout (``kernel (s**D, Cin, Cout)``, ``bias (1, Cout)``), so
    official checkpoints load. The output sites' children are gathered into one ``(N_out, s**D*Cin)``
    matrix and multiplied once: ME's general convolution runs one small GEMM per kernel offset.
    """

    def __init__(self, in_dim: int, out_dim: int, stride: int = 2, spatial_dims: int = 2):
        super().__init__()
        self.stride = stride
        self.kernel = nn.Parameter(torch.empty(stride ** spatial_dims, in_dim, out_dim))
        self.bias = nn.Parameter(torch.zeros(1, out_dim))
        nn.init.kaiming_uniform_(self.kernel, a=math.sqrt(5))

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        out_key, children = child_table(x, self.stride)
        out = self.forward_rows(x.F, children)
        return ME.SparseTensor(out, coordinate_map_key=out_key, coordinate_manager=x.coordinate_manager)

    def forward_rows(self, f: torch.Tensor, children: torch.Tensor) -> torch.Tensor:
        """``(N_out, Cout)`` features of the output sites from the input's ``f (N, Cin)`` and the child table."""
        n, c = f.shape
        padded = torch.cat([f, f.new_zeros(1, c)])  # row n: an absent child contributes zero
        idx = torch.where(children < 0, torch.full_like(children, n), children)
        # explicit width: with no visible site (N_out = 0) a -1 would be ambiguous
        gathered = padded.index_select(0, idx.reshape(-1)).reshape(idx.shape[0], idx.shape[1] * c)  # (N_out, s**D*Cin)
        w = self.kernel.reshape(-1, self.kernel.shape[-1]).to(gathered.dtype)
        return torch.addmm(self.bias.to(gathered.dtype), gathered, w)
