"""FCMAE: fully convolutional masked autoencoder with a ConvNeXt V2 encoder (sparse by default), for
images (``spatial_dims=2``) and volumes (``spatial_dims=3``)."""
from __future__ import annotations

import math

import torch
from timm.layers import trunc_normal_
from torch import nn

from ..masking import num_kept, random_patch_mask
from .base import PATCH_SIZE
from .convnextv2 import DenseMaskedConvNeXtV2, SparseConvNeXtV2
from .layers import Block, conv_nd, pointwise

ENCODERS = {"sparse": SparseConvNeXtV2, "dense_masked": DenseMaskedConvNeXtV2}


class FCMAE(nn.Module):
    """Encoder on visible patches -> 1x1 proj -> mask tokens -> dense blocks -> 1x1 pred -> masked MSE.

    Parameter names follow the official checkpoint (``encoder.*``, ``proj``, ``mask_token``,
    ``decoder.N``, ``pred``); any number of input channels. Images ``(B, C, H, W)`` or, with
    ``spatial_dims=3``, volumes ``(B, C, D, H, W)`` (patches of ``32^3`` voxels, ``pred`` predicts
    ``32^3 * C`` values per patch). ``kernel_size`` is the encoder's depthwise kernel (the decoder's
    block keeps the official 7).
    """

    def __init__(
        self,
        size: str = "atto",
        in_chans: int = 3,
        mask_ratio: float = 0.6,
        decoder_depth: int = 1,
        decoder_dim: int = 512,
        norm_pix_loss: bool = True,
        drop_path_rate: float = 0.0,
        encoder: str = "sparse",
        kernel_size: int = 7,
        spatial_dims: int = 2,
    ):
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {sorted(ENCODERS)}, got {encoder!r}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        conv = conv_nd(spatial_dims)  # also rejects spatial_dims other than 2 and 3
        self.patch_size = PATCH_SIZE
        self.in_chans = in_chans
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.spatial_dims = spatial_dims
        self.encoder = ENCODERS[encoder](size=size, in_chans=in_chans, drop_path_rate=drop_path_rate,
                                         kernel_size=kernel_size, spatial_dims=spatial_dims)
        self.proj = conv(self.encoder.num_features, decoder_dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_dim, *([1] * spatial_dims)))
        self.decoder = nn.Sequential(*[Block(decoder_dim, spatial_dims=spatial_dims) for _ in range(decoder_depth)])
        self.pred = conv(decoder_dim, PATCH_SIZE ** spatial_dims * in_chans, kernel_size=1)
        for m in [self.proj, self.pred, *self.decoder.modules()]:
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear)):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    # ---- patch layout: (N, C, h*p, w*p) <-> (N, h*w, p*p*C), as the official patchify; volumes:
    # (N, C, d*p, h*p, w*p) <-> (N, d*h*w, p*p*p*C), patches and in-patch voxels both row-major ----
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        p, c, d = self.patch_size, imgs.shape[1], imgs.ndim - 2
        grid = [s // p for s in imgs.shape[2:]]
        x = imgs.reshape(imgs.shape[0], c, *(v for g in grid for v in (g, p)))  # (N, C, g0, p, g1, p, ...)
        x = x.permute(0, *range(2, 2 + 2 * d, 2), *range(3, 3 + 2 * d, 2), 1)  # (N, g0, g1, .., p, p, .., C)
        return x.reshape(imgs.shape[0], math.prod(grid), p ** d * c)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        p, d = self.patch_size, len(grid)
        c = x.shape[-1] // p ** d
        x = x.reshape(x.shape[0], *grid, *([p] * d), c)
        x = x.permute(0, 2 * d + 1, *(v for a in range(d) for v in (1 + a, 1 + d + a)))  # (N, C, g0, p, g1, p, ..)
        return x.reshape(x.shape[0], c, *(g * p for g in grid))

    def random_masking(self, imgs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        grid = self.encoder.check_input(imgs)
        return random_patch_mask(imgs.shape[0], grid, self.mask_ratio, generator=generator, device=imgs.device)

    def forward_encoder(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if getattr(self.encoder, "graph", False):  # static shapes: every mask keeps the ratio's patch count
            return self.encoder.forward_features(imgs, mask, num_visible=num_kept(mask.shape[1], self.mask_ratio))
        return self.encoder.forward_features(imgs, mask)

    def forward_decoder(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, C, *g)`` encoder map -> ``(B, p**D * in_chans, *g)`` pixel predictions."""
        x = pointwise(self.proj, feats)
        m = mask.reshape(-1, 1, *x.shape[2:]).to(x.dtype)
        x = x * (1.0 - m) + self.mask_token.to(x.dtype) * m
        return pointwise(self.pred, self.decoder(x))

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE over masked patches only; targets normalised per patch when ``norm_pix_loss``."""
        pred = pred.flatten(2).transpose(1, 2)  # (N, L, p**D*C), same order as patchify
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        loss = ((pred.float() - target.float()) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor | None = None, generator: torch.Generator | None = None):
        """Returns ``(loss, pred (B, p**D*C, *g), mask (B, L))``; ``g`` the patch grid, ``L = prod(g)``."""
        if mask is None:
            mask = self.random_masking(imgs, generator)
        pred = self.forward_decoder(self.forward_encoder(imgs, mask), mask)
        return self.forward_loss(imgs, pred, mask), pred, mask

    def reconstruct(self, pred: torch.Tensor, imgs: torch.Tensor) -> torch.Tensor:
        """Predictions -> images (volumes), undoing the per-patch normalisation with the true patch statistics."""
        grid = tuple(s // self.patch_size for s in imgs.shape[2:])
        x = pred.flatten(2).transpose(1, 2)
        if self.norm_pix_loss:
            target = self.patchify(imgs)
            x = x * (target.var(dim=-1, keepdim=True) + 1e-6).sqrt() + target.mean(dim=-1, keepdim=True)
        return self.unpatchify(x, grid)
