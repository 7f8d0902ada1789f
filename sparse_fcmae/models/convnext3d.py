"""A dense 3D ConvNeXt V2 in plain torch (Conv3d, channels-first) with timm-style key names, for
fine-tuning on volumes and as the mask-ratio-0 oracle of the sparse 3D encoder.

Keys and shapes (``k`` the depthwise kernel size): ``stem.0.weight (C0, Cin, 4, 4, 4)``, ``stem.1.*``
(LayerNorm), ``stages.{i}.downsample.0.*`` (LayerNorm), ``stages.{i}.downsample.1.weight (Ci, Ci-1, 2, 2, 2)``
(i > 0), ``stages.{i}.blocks.{j}.conv_dw.weight (C, 1, k, k, k)``, ``.norm.*``, ``.mlp.fc1.*`` (Linear),
``.mlp.grn.weight/bias (4C,)``, ``.mlp.fc2.*``, ``head.norm.*``, ``head.fc.*``.
"""
from __future__ import annotations

import torch
from timm.layers import DropPath, trunc_normal_
from torch import nn

from .base import KERNEL_SIZES, check_input, drop_rates
from .layers import LayerNorm2d, PatchConv3d
from .sizes import get_size


class GlobalResponseNorm(nn.Module):
    """timm's GRN on channels-last ``(B, D, H, W, C)``: ``weight``/``bias (C,)``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.linalg.vector_norm(x, ord=2, dim=(1, 2, 3), keepdim=True)
        n = g / (g.mean(dim=-1, keepdim=True) + self.eps)
        return x + self.weight * (x * n) + self.bias


class Mlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = GlobalResponseNorm(4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.grn(self.act(self.fc1(x))))


class Block3d(nn.Module):
    """``(B, C, D, H, W)``: dwconv k^3 -> LN -> MLP with GRN -> drop path -> + x."""

    def __init__(self, dim: int, kernel_size: int = 7, drop_path: float = 0.0):
        super().__init__()
        self.conv_dw = nn.Conv3d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(self.norm(self.conv_dw(x).movedim(1, -1))).movedim(-1, 1)
        return x + self.drop_path(y)


class Stage3d(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, kernel_size: int, rates, downsample: bool):
        super().__init__()
        self.downsample = (
            nn.Sequential(LayerNorm2d(in_dim, eps=1e-6), PatchConv3d(in_dim, dim, 2, stride=2)) if downsample else nn.Identity()
        )
        self.blocks = nn.Sequential(*[Block3d(dim, kernel_size, rates[j]) for j in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class NormHead(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x.mean(dim=(2, 3, 4)))
        return x if pre_logits else self.fc(x)


class ConvNeXtV2_3D(nn.Module):
    """``forward_features(x (B, Cin, D, H, W)) -> (B, dims[-1], D/32, H/32, W/32)``;
    ``forward(x) -> (B, num_classes)`` (pooled, normalised features when ``num_classes = 0``)."""

    def __init__(self, size: str | None = "atto", in_chans: int = 1, num_classes: int = 0, kernel_size: int = 7,
                 drop_path_rate: float = 0.0, depths=None, dims=None):
        super().__init__()
        if size is not None:
            depths, dims = get_size(size)
        if kernel_size not in KERNEL_SIZES:
            raise ValueError(f"kernel_size must be one of {KERNEL_SIZES}, got {kernel_size!r}")
        self.in_chans, self.depths, self.dims, self.kernel_size = in_chans, tuple(depths), tuple(dims), kernel_size
        self.num_features = self.dims[-1]
        self.stem = nn.Sequential(PatchConv3d(in_chans, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
        rates = drop_rates(self.depths, drop_path_rate)
        self.stages = nn.Sequential(*[
            Stage3d(dims[max(i - 1, 0)], dims[i], depths[i], kernel_size, rates[i], downsample=i > 0) for i in range(4)
        ])
        self.head = NormHead(self.dims[-1], num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.Linear)):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_chans, spatial_dims=3)
        return self.stages(self.stem(x))

    def forward_head(self, feats: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooled, normalised features (``pre_logits``) or logits: timm's interface, which fine-tuning uses."""
        return self.head(feats, pre_logits=pre_logits)

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's ConvNeXt grouping (stem, then each downsampling and block): layer-wise lr decay reads it."""
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
