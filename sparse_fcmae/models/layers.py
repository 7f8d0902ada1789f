"""Dense layers: channels-first LayerNorm, GRN, and the dense ConvNeXt V2 block (decoder).

Images ``(B, C, H, W)`` and volumes ``(B, C, D, H, W)`` share them (``spatial_dims`` 2 or 3).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

SPATIAL_DIMS = (2, 3)


def check_spatial_dims(spatial_dims: int) -> int:
    if spatial_dims not in SPATIAL_DIMS:
        raise ValueError(f"spatial_dims must be 2 (images) or 3 (volumes), got {spatial_dims!r}")
    return spatial_dims


class PatchConv3d(nn.Conv3d):
    """``Conv3d`` whose kernel equals its stride (the 4^3 stem, the 2^3 downsampling): one matmul over the
    non-overlapping patches, the same parameters and maths. oneDNN's Conv3d took ~12x longer for the stem
    (CPU, 2 x 1 x 64^3, forward + backward). Input sizes must be multiples of the stride; the output is
    channels-last in memory."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (k0, k1, k2), (b, c, d, h, w) = self.kernel_size, x.shape
        g = (d // k0, h // k1, w // k2)
        patches = x.reshape(b, c, g[0], k0, g[1], k1, g[2], k2).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, *g, -1)
        return F.linear(patches, self.weight.flatten(1), self.bias).movedim(-1, 1)  # weight order (c, k0, k1, k2)


def pointwise(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 (x1) convolution; volumes as a matmul over the channels (oneDNN's 1x1 Conv3d took ~25x longer
    for FCMAE's prediction head on CPU)."""
    if x.ndim == 5:
        return F.linear(x.movedim(1, -1), conv.weight.flatten(1), conv.bias).movedim(-1, 1)
    return conv(x)


def depthwise_nd(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv`` (depthwise, odd kernel, 'same' padding) on ``x``; on volumes smaller than the kernel, the
    taps that can only read zero padding are dropped (exact), as oneDNN is slow on tiny 3D grids (the
    decoder's 7^3 conv on a 2^3 patch grid)."""
    k = conv.kernel_size[0]
    if x.ndim != 5 or all(2 * s - 1 >= k for s in x.shape[2:]):
        return conv(x)
    crop = [min(k, 2 * s - 1) for s in x.shape[2:]]  # odd: the taps within reach of the grid, centred
    w = conv.weight[(slice(None), slice(None)) + tuple(slice((k - c) // 2, (k + c) // 2) for c in crop)]
    return F.conv3d(x, w, conv.bias, padding=tuple(c // 2 for c in crop), groups=conv.groups)


def conv_nd(spatial_dims: int) -> type[nn.Module]:
    """``nn.Conv2d`` or ``nn.Conv3d``."""
    return {2: nn.Conv2d, 3: nn.Conv3d}[check_spatial_dims(spatial_dims)]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a channels-first map ``(B, C, *S)`` (images or volumes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.movedim(1, -1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.movedim(-1, 1)


class GRN(nn.Module):
    """Global response normalisation on channels-last ``(B, *S, C)`` maps (official dense layout);
    the parameters are ``(1, 1, 1, C)`` for images and ``(1, 1, 1, 1, C)`` for volumes."""

    def __init__(self, dim: int, eps: float = 1e-6, spatial_dims: int = 2):
        super().__init__()
        shape = (1,) * (spatial_dims + 1) + (dim,)
        self.gamma = nn.Parameter(torch.zeros(shape))
        self.beta = nn.Parameter(torch.zeros(shape))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.linalg.vector_norm(x, ord=2, dim=tuple(range(1, x.ndim - 1)), keepdim=True)
        n = g / (g.mean(dim=-1, keepdim=True) + self.eps)
        return x + self.gamma * (x * n) + self.beta


class Block(nn.Module):
    """Dense ConvNeXt V2 block ``(B, C, *S) -> (B, C, *S)``; the FCMAE decoder's block."""

    def __init__(self, dim: int, drop_path: float = 0.0, kernel_size: int = 7, spatial_dims: int = 2):
        super().__init__()
        self.dwconv = conv_nd(spatial_dims)(dim, dim, kernel_size=kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = GRN(4 * dim, spatial_dims=spatial_dims)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = depthwise_nd(self.dwconv, x).movedim(1, -1)
        x = self.pwconv2(self.grn(self.act(self.pwconv1(self.norm(x)))))
        return shortcut + self.drop_path(x.movedim(-1, 1))
