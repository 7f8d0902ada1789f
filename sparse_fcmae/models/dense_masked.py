"""The dense-masked ConvNeXt V2 encoder: the sparse encoder's parameters run as dense ops, the mask
re-applied after every spatial op and GRN's norm taken over visible sites only (as SparK and the
official JAX code simulate sparsity). The test oracle and the benchmark baseline; images (Conv2d) and
volumes (Conv3d, ``spatial_dims=3``) share the code.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from ..masking import upsample_mask
from ..ops.kernel_layout import conv_kernel_to_weight, depthwise_kernel_to_weight
from .base import PATCH_SIZE, STEM_STRIDE, EncoderBase, drop_rates, stem

_CONV = {2: F.conv2d, 3: F.conv3d}


def physical_format(memory_format: torch.memory_format, spatial_dims: int) -> torch.memory_format:
    """The layout a ``2 + spatial_dims``-D tensor takes for ``memory_format``: channels_last means
    ``torch.channels_last_3d`` for volumes."""
    if memory_format == torch.channels_last and spatial_dims == 3:
        return torch.channels_last_3d
    return memory_format


class _DenseLayerNorm(nn.Module):
    """Channels-last LayerNorm with the sparse layer's parameter names (``ln.*``)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.ln = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x)


class _DenseLinear(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.linear = nn.Linear(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class _DenseDepthwise(nn.Module):
    """Depthwise conv storing ME's ``kernel (k**D, C)``; maps are ``(B, *S, C)`` views whose memory is
    in ``memory_format`` (set by the encoder: cuDNN's depthwise conv is faster in NCHW on some GPUs,
    oneDNN's in channels_last on CPU)."""

    memory_format = torch.channels_last

    def __init__(self, dim: int, kernel_size: int = 7, spatial_dims: int = 2):
        super().__init__()
        self.kernel_size = kernel_size
        self.spatial_dims = spatial_dims
        self.memory_format = physical_format(torch.channels_last, spatial_dims)
        self.kernel = nn.Parameter(torch.empty(kernel_size ** spatial_dims, dim))
        self.bias = nn.Parameter(torch.zeros(1, dim))
        nn.init.kaiming_uniform_(self.kernel, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = depthwise_kernel_to_weight(self.kernel, self.spatial_dims)
        # a no-op when the stream is already in memory_format (the encoder keeps it so)
        xin = x.movedim(-1, 1).contiguous(memory_format=self.memory_format)
        y = _CONV[self.spatial_dims](xin, w, self.bias.reshape(-1), padding=self.kernel_size // 2, groups=w.shape[0])
        return y.movedim(1, -1)


class _DenseDownsampleConv(nn.Module):
    """2x2(x2) stride-2 conv storing ME's ``kernel (2**D, Cin, Cout)`` and ``bias (1, Cout)``; its output
    memory is in ``memory_format`` (a convolution's output follows its input's layout)."""

    memory_format = torch.channels_last

    def __init__(self, cin: int, cout: int, spatial_dims: int = 2):
        super().__init__()
        self.spatial_dims = spatial_dims
        self.memory_format = physical_format(torch.channels_last, spatial_dims)
        self.kernel = nn.Parameter(torch.empty(2 ** spatial_dims, cin, cout))
        self.bias = nn.Parameter(torch.zeros(1, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xin = x.movedim(-1, 1).contiguous(memory_format=self.memory_format)
        w = conv_kernel_to_weight(self.kernel, self.spatial_dims)
        y = _CONV[self.spatial_dims](xin, w, self.bias.reshape(-1), stride=2)
        return y.movedim(1, -1)


class _MaskedGRN(nn.Module):
    """GRN whose norm is taken over each sample's visible sites only (``(B, *S, C)`` maps)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, dim))
        self.beta = nn.Parameter(torch.zeros(1, dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        g = torch.linalg.vector_norm(x * m, ord=2, dim=tuple(range(1, x.ndim - 1)), keepdim=True)
        n = g / (g.mean(dim=-1, keepdim=True) + self.eps)
        return x + self.gamma * (x * n) + self.beta


class DenseMaskedBlock(nn.Module):
    def __init__(self, dim: int, drop_path: float = 0.0, kernel_size: int = 7, spatial_dims: int = 2):
        super().__init__()
        self.dwconv = _DenseDepthwise(dim, kernel_size, spatial_dims)
        self.norm = _DenseLayerNorm(dim)
        self.pwconv1 = _DenseLinear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = _MaskedGRN(4 * dim)
        self.pwconv2 = _DenseLinear(4 * dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """``x (B, *S, C)`` zero at masked sites; ``m (B, *S, 1)``, 1 = visible."""
        y = self.act(self.pwconv1(self.norm(self.dwconv(x))))
        y = self.pwconv2(self.grn(y, m))
        return (x + self.drop_path(y)) * m


class DenseMaskedConvNeXtV2(EncoderBase):
    """Dense simulation of the sparse encoder (as SparK and the official JAX code do).

    ``forward_features(x (B, Cin, *S), mask (B, prod(S/32)), 1 = masked)`` -> ``(B, dims[-1], *S/32)``,
    ``S = (H, W)`` (``spatial_dims=2``) or ``(D, H, W)`` (``spatial_dims=3``).

    ``memory_format`` (``set_memory_format``): the physical layout of the feature maps between blocks,
    ``torch.channels_last`` (``channels_last_3d`` for volumes) or ``torch.contiguous_format``; every
    convolution runs in it. Default: channels_last for images, contiguous for volumes (measured on this
    CPU, atto 64^3: oneDNN's 7^3 depthwise conv is ~10x slower forward in channels_last_3d). The maps are handled as ``(B, *S, C)`` views either way (LayerNorm,
    Linear and GRN act on the last axis); a residual sum keeps the stream's layout (its first operand's).
    """

    memory_format = torch.channels_last

    def __init__(self, size: str | None = "atto", in_chans: int = 3, depths=None, dims=None, drop_path_rate: float = 0.0,
                 kernel_size: int = 7, spatial_dims: int = 2):
        super().__init__(size, in_chans, depths, dims, drop_path_rate, kernel_size, spatial_dims)
        d, sd = self.dims, self.spatial_dims
        self.downsample_layers = nn.ModuleList([stem(in_chans, d[0], sd)])
        for i in range(1, 4):
            self.downsample_layers.append(nn.Sequential(_DenseLayerNorm(d[i - 1]), _DenseDownsampleConv(d[i - 1], d[i], sd)))
        rates = drop_rates(self.depths, drop_path_rate)
        self.stages = nn.ModuleList(
            nn.ModuleList(DenseMaskedBlock(d[i], rates[i][j], kernel_size, sd) for j in range(self.depths[i]))
            for i in range(4)
        )
        self._init_weights()
        if self.spatial_dims == 3:
            self.set_memory_format(torch.contiguous_format)

    def set_memory_format(self, memory_format: torch.memory_format) -> DenseMaskedConvNeXtV2:
        if memory_format not in (torch.channels_last, torch.contiguous_format):
            raise ValueError(f"memory_format must be torch.channels_last or torch.contiguous_format, got {memory_format}")
        self.memory_format = memory_format
        for m in self.modules():
            if isinstance(m, (_DenseDepthwise, _DenseDownsampleConv)):
                m.memory_format = physical_format(memory_format, self.spatial_dims)
        return self

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        grid = self.check_input(x)
        if mask is None:
            mask = self.default_mask(x)
        fmt = physical_format(self.memory_format, self.spatial_dims)
        visible = (1.0 - upsample_mask(mask, grid, PATCH_SIZE // STEM_STRIDE)).to(x.dtype).unsqueeze(-1)  # (B, *S/4, 1)
        x = x.contiguous(memory_format=fmt)  # the stem's output follows its input's layout
        x = self.downsample_layers[0](x).movedim(1, -1) * visible
        every_other = (slice(None),) + (slice(None, None, 2),) * self.spatial_dims
        for i in range(4):
            if i > 0:
                visible = visible[every_other]  # visible sites come in whole patches: exact
                x = self.downsample_layers[i](x) * visible
            for blk in self.stages[i]:
                x = blk(x, visible)
        return x.movedim(-1, 1).contiguous(memory_format=fmt)

    forward = forward_features
