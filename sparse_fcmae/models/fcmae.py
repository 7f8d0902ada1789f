"""FCMAE: fully convolutional masked autoencoder with a ConvNeXt V2 encoder (sparse by default)."""
from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import nn

from ..masking import random_patch_mask
from .convnextv2 import PATCH_SIZE, DenseMaskedConvNeXtV2, SparseConvNeXtV2, _check_input
from .layers import Block

ENCODERS = {"sparse": SparseConvNeXtV2, "dense_masked": DenseMaskedConvNeXtV2}


class FCMAE(nn.Module):
    """Encoder on visible patches -> 1x1 proj -> mask tokens -> dense blocks -> 1x1 pred -> masked MSE.

    Parameter names follow the official checkpoint (``encoder.*``, ``proj``, ``mask_token``,
    ``decoder.N``, ``pred``); any number of input channels.
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
    ):
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {sorted(ENCODERS)}, got {encoder!r}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.patch_size = PATCH_SIZE
        self.in_chans = in_chans
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.encoder = ENCODERS[encoder](size=size, in_chans=in_chans, drop_path_rate=drop_path_rate)
        self.proj = nn.Conv2d(self.encoder.num_features, decoder_dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_dim, 1, 1))
        self.decoder = nn.Sequential(*[Block(decoder_dim) for _ in range(decoder_depth)])
        self.pred = nn.Conv2d(decoder_dim, PATCH_SIZE ** 2 * in_chans, kernel_size=1)
        for m in [self.proj, self.pred, *self.decoder.modules()]:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    # ---- patch layout: (N, C, h*p, w*p) <-> (N, h*w, p*p*C), as the official patchify ----
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        p, c = self.patch_size, imgs.shape[1]
        h, w = imgs.shape[2] // p, imgs.shape[3] // p
        x = imgs.reshape(imgs.shape[0], c, h, p, w, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(imgs.shape[0], h * w, p * p * c)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        p, (h, w) = self.patch_size, grid
        c = x.shape[-1] // (p * p)
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, w, p, p, c))
        return x.reshape(x.shape[0], c, h * p, w * p)

    def random_masking(self, imgs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        gh, gw = _check_input(imgs, self.in_chans)
        return random_patch_mask(imgs.shape[0], (gh, gw), self.mask_ratio, generator=generator, device=imgs.device)

    def forward_encoder(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward_features(imgs, mask)

    def forward_decoder(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` encoder map -> ``(B, p*p*in_chans, h, w)`` pixel predictions."""
        x = self.proj(feats)
        m = mask.reshape(-1, 1, x.shape[2], x.shape[3]).to(x.dtype)
        x = x * (1.0 - m) + self.mask_token.to(x.dtype) * m
        return self.pred(self.decoder(x))

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE over masked patches only; targets normalised per patch when ``norm_pix_loss``."""
        pred = pred.flatten(2).transpose(1, 2)  # (N, h*w, p*p*C), same order as patchify
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        loss = ((pred.float() - target.float()) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor | None = None, generator: torch.Generator | None = None):
        """Returns ``(loss, pred (B, p*p*C, h, w), mask (B, h*w))``."""
        if mask is None:
            mask = self.random_masking(imgs, generator)
        pred = self.forward_decoder(self.forward_encoder(imgs, mask), mask)
        return self.forward_loss(imgs, pred, mask), pred, mask

    def reconstruct(self, pred: torch.Tensor, imgs: torch.Tensor) -> torch.Tensor:
        """Predictions -> images, undoing the per-patch normalisation with the true patch statistics."""
        grid = (imgs.shape[2] // self.patch_size, imgs.shape[3] // self.patch_size)
        x = pred.flatten(2).transpose(1, 2)
        if self.norm_pix_loss:
            target = self.patchify(imgs)
            x = x * (target.var(dim=-1, keepdim=True) + 1e-6).sqrt() + target.mean(dim=-1, keepdim=True)
        return self.unpatchify(x, grid)
