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
        x = self.dwconv(x).movedim(1, -1)
        x = self.pwconv2(self.grn(self.act(self.pwconv1(self.norm(x)))))
        return shortcut + self.drop_path(x.movedim(-1, 1))
