"""What the sparse encoder and its dense-masked twin share: input checks, the stem, drop-path rates,
and the base class holding the size, channels, kernel size and spatial dimensions."""
from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import nn

from .layers import LayerNorm2d, PatchConv3d, check_spatial_dims, conv_nd
from .sizes import get_size

PATCH_SIZE = 32  # the encoder's total stride; one mask patch = one output site (32 px, or 32^3 voxels)
STEM_STRIDE = 4
KERNEL_SIZES = (3, 5, 7)  # odd: submanifold convolutions are centred (7 is ConvNeXt's)


def check_input(x: torch.Tensor, in_chans: int, spatial_dims: int = 2) -> tuple[int, ...]:
    """The patch grid ``(H/32, W/32)`` of images ``(B, C, H, W)``, or ``(D/32, H/32, W/32)`` of volumes
    ``(B, C, D, H, W)``; one-line errors for a wrong shape or a size not divisible by 32."""
    what, axes = ("images", "H, W") if spatial_dims == 2 else ("volumes", "D, H, W")
    if x.ndim != 2 + spatial_dims or x.shape[1] != in_chans:
        raise ValueError(f"expected {what} (B, {in_chans}, {axes}), got {tuple(x.shape)}")
    sizes = tuple(x.shape[2:])
    if any(s % PATCH_SIZE for s in sizes):
        raise ValueError(f"{what[:-1]} size {'x'.join(map(str, sizes))} is not divisible by {PATCH_SIZE}")
    return tuple(s // PATCH_SIZE for s in sizes)



def stem(in_chans: int, dim: int, spatial_dims: int = 2) -> nn.Sequential:
    """``Conv{2,3}d(in_chans, dim, 4, stride 4)`` + channels-first LayerNorm."""
    conv = (PatchConv3d if spatial_dims == 3 else conv_nd(spatial_dims))(in_chans, dim, kernel_size=STEM_STRIDE,
                                                                          stride=STEM_STRIDE)
    return nn.Sequential(conv, LayerNorm2d(dim, eps=1e-6))


def drop_rates(depths, drop_path_rate: float) -> list[list[float]]:
    rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
    out, i = [], 0
    for d in depths:
        out.append(rates[i : i + d])
        i += d
    return out


class EncoderBase(nn.Module):
    def __init__(self, size: str | None, in_chans: int, depths, dims, drop_path_rate: float,
                 kernel_size: int = 7, spatial_dims: int = 2):
        super().__init__()
        if size is not None:
            depths, dims = get_size(size)
        if depths is None or dims is None:
            raise ValueError("give a size name or both depths and dims")
        if kernel_size not in KERNEL_SIZES:
            raise ValueError(f"kernel_size must be one of {KERNEL_SIZES}, got {kernel_size!r}")
        self.size = size
        self.in_chans = in_chans
        self.depths = tuple(depths)
        self.dims = tuple(dims)
        self.num_features = self.dims[-1]
        self.drop_path_rate = drop_path_rate
        self.kernel_size = kernel_size
        self.spatial_dims = check_spatial_dims(spatial_dims)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear)):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            for name in ("kernel",):
                p = getattr(m, name, None)
                if isinstance(p, nn.Parameter):
                    trunc_normal_(p, std=0.02)
                    if getattr(m, "bias", None) is not None:
                        nn.init.zeros_(m.bias)

    def check_input(self, x: torch.Tensor) -> tuple[int, ...]:
        """The patch grid of ``x`` (see :func:`check_input`)."""
        return check_input(x, self.in_chans, self.spatial_dims)

    def default_mask(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.check_input(x)
        n = 1
        for g in grid:
            n *= g
        return x.new_zeros(x.shape[0], n)
