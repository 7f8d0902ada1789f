"""Volume data (``model.spatial_dims=3``): procedural volumes for smoke tests and benchmarks.

Items are ``(volume (C, S, S, S), label)`` with ``S = img_size`` (the edge of a cubic volume, divisible
by 32), like the image datasets' ``(image (C, S, S), label)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

VOLUME_DATASETS = ("synthetic3d",)  # the data= choices that give volumes (model.spatial_dims=3)


class SyntheticVolumeDataset(Dataset):
    """Procedural volumes, any edge and channel count, no files.

    Volume ``i`` is a smooth random field (two octaves of trilinearly upsampled noise) plus a bright ball,
    generated from ``(seed, i)``: the same index always gives the same volume.
    """

    def __init__(self, num_images: int = 64, img_size: int = 64, in_chans: int = 1, seed: int = 0):
        if num_images < 1 or in_chans < 1:
            raise ValueError(f"synthetic volumes need num_images >= 1 and in_chans >= 1, got {num_images}, {in_chans}")
        if img_size < 32 or img_size % 32:
            raise ValueError(f"img_size (the volume's edge) must be divisible by 32, got {img_size}")
        self.num_images, self.img_size, self.in_chans, self.seed = num_images, img_size, in_chans, seed
        self.num_classes = 1  # unlabelled: every label is 0

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        s, c = self.img_size, self.in_chans
        vol = torch.zeros(1, c, s, s, s)
        for cells, amp in ((4, 1.0), (8, 0.3)):
            noise = torch.randn(1, c, cells, cells, cells, generator=g)
            vol += amp * F.interpolate(noise, size=(s, s, s), mode="trilinear", align_corners=False)
        cz, cy, cx, r = (torch.rand(4, generator=g) * torch.tensor([s, s, s, s / 4])).tolist()
        zz, yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), torch.arange(s), indexing="ij")
        vol[0, :, ((zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2) < (r + 2) ** 2] += 1.5
        return vol[0], 0
