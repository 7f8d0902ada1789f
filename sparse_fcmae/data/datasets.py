"""The datasets without files (the embedded digits, synthetic images) and the one dataset switch."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .folders import image_folder


class DigitsDataset(Dataset):
    """scikit-learn's bundled handwritten digits (1,797 8x8 grayscale images), upsampled.

    Pixels are scaled to [0, 1], bilinearly upsampled to ``img_size`` and standardised with the
    dataset's own mean and std. ``split``: ``all``, or a seeded ``train`` / ``test`` split (80/20).
    """

    def __init__(self, img_size: int = 128, split: str = "all", seed: int = 0, flip: bool = False):
        from sklearn.datasets import load_digits  # bundled with scikit-learn: nothing is downloaded

        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8)
        labels = torch.from_numpy(digits.target.astype(np.int64))
        if split != "all":
            if split not in ("train", "test"):
                raise ValueError(f"split must be all, train or test, got {split!r}")
            perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
            cut = int(0.8 * len(labels))
            idx = perm[:cut] if split == "train" else perm[cut:]
            images, labels = images[idx], labels[idx]
        images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
        self.mean, self.std = float(images.mean()), float(images.std())
        self.images = (images - self.mean) / self.std
        self.labels = labels
        self.flip = flip
        self.num_classes = 10
        self.in_chans = 1

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = self.images[i]
        if self.flip and torch.rand(()) < 0.5:
            img = img.flip(-1)
        return img, self.labels[i]


class SyntheticDataset(Dataset):
    """Procedural images for smoke tests and benchmarks: any size, any channel count, no files.

    Image ``i`` is a smooth random field (two octaves of bicubically upsampled noise) plus a bright
    disc, generated from ``(seed, i)``: the same index always gives the same image.
    """

    def __init__(self, num_images: int = 1024, img_size: int = 224, in_chans: int = 3, seed: int = 0):
        if num_images < 1 or in_chans < 1:
            raise ValueError(f"synthetic data needs num_images >= 1 and in_chans >= 1, got {num_images}, {in_chans}")
        self.num_images, self.img_size, self.in_chans, self.seed = num_images, img_size, in_chans, seed
        self.num_classes = 1  # unlabelled: every label is 0

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        s, c = self.img_size, self.in_chans
        img = torch.zeros(1, c, s, s)
        for cells, amp in ((4, 1.0), (16, 0.3)):
            noise = torch.randn(1, c, cells, cells, generator=g)
            img += amp * F.interpolate(noise, size=(s, s), mode="bicubic", align_corners=False)
        cy, cx, r = (torch.rand(3, generator=g) * torch.tensor([s, s, s / 4])).tolist()
        yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
        img[0, :, ((yy - cy) ** 2 + (xx - cx) ** 2) < (r + 2) ** 2] += 1.5
        return img[0], 0


# each data group's own keys (conf/data/<name>.yaml), passed to build_dataset when the group has them
GROUP_KEYS = ("num_images", "crop_scale", "split", "npy_layout", "urls", "epoch_size", "shuffle_buffer")
VOLUME_KEYS = ("clip", "clip_percentiles", "normalize")  # conf/data/volumes.yaml's intensity options


def group_kwargs(d) -> dict:
    """``build_dataset``'s keyword arguments from a data config group (``cfg.data``): the keys the group defines,
    so every dataset keeps its own defaults. One mapping for pretraining and fine-tuning."""
    own = {k: d[k] for k in GROUP_KEYS if k in d}
    if "crop_scale" in own:
        own["crop_scale"] = tuple(own["crop_scale"])
    if d["name"] == "volumes":
        own.update(volume={k: d[k] for k in VOLUME_KEYS}, flip=d["flip"])
    return own


def build_dataset(name: str, img_size: int, in_chans: int, root: str | None = None, seed: int = 0, train: bool = True,
                  num_images: int = 1024, crop_scale=(0.2, 1.0), split: str = "all", flip: bool | None = None,
                  npy_layout: str = "auto", augment: dict | None = None, urls=None, epoch_size: int | None = None,
                  shuffle_buffer: int = 1000, volume: dict | None = None, labels: bool = False,
                  num_classes: int | None = None, once: bool = False):
    """The one dataset switch (pretraining, fine-tuning, linear probing).

    ``train``: training augmentation (image folders: random resized crop + flip; else resize + centre crop).
    ``split``: the digits' seeded split (an image folder's split is its ``root``). ``flip``: digits only,
    default ``train``. ``npy_layout``: image folders' ``.npy`` axis order. ``augment``: image folders' fine-tuning
    extras (``rand_augment``, ``reprob``, ``crop_pct``; see ``_fcmae_transform``). ``urls``, ``epoch_size``,
    ``shuffle_buffer``: webdataset shards (``ShardStream``, an iterable of ``(image, skipped)``; fine-tuning's ``labels``,
    ``num_classes`` and ``once``: ``(image, label, skipped)`` from each sample's ``.cls``). ``volume``: a
    volume folder's ``clip``, ``clip_percentiles``, ``normalize`` (``conf/data/volumes.yaml``). Every dataset has
    ``num_classes``; map-style items are ``(image, label[, skipped])``.
    """
    if img_size % 32:
        raise ValueError(f"img_size must be divisible by 32, got {img_size}")
    if name == "digits":
        if in_chans != 1:
            raise ValueError(f"the digits are grayscale: data.in_chans must be 1, got {in_chans}")
        return DigitsDataset(img_size, split=split, seed=seed, flip=train if flip is None else flip)
    if name == "imagefolder":
        if not root:
            raise ValueError("data=imagefolder needs data.root=/path/to/images")
        return image_folder(root, img_size, in_chans, train=train, crop_scale=crop_scale, npy_layout=npy_layout,
                            augment=augment)
    if name == "webdataset":
        from .shards import ShardStream  # imports webdataset only when used

        return ShardStream(urls, img_size, in_chans, seed=seed, epoch_size=epoch_size, shuffle_buffer=shuffle_buffer,
                           crop_scale=crop_scale, npy_layout=npy_layout, augment=augment, train=train, labels=labels,
                           num_classes=num_classes, once=once)
    if name == "synthetic":
        return SyntheticDataset(num_images, img_size, in_chans, seed=seed)
    if name == "synthetic3d":  # volumes (model.spatial_dims=3): data.img_size is the cube's edge
        from .volumes import SyntheticVolumeDataset
        return SyntheticVolumeDataset(num_images, img_size, in_chans, seed=seed)
    if name == "volumes":  # a folder of NIfTI / .npy volumes (model.spatial_dims=3)
        from .volumes import VolumeFolder
        if not root:
            raise ValueError("data=volumes needs data.root=/path/to/volumes")
        opts = {**(volume or {}), "npy_layout": npy_layout, "flip": train if flip is None else flip}
        return VolumeFolder(root, img_size, in_chans, train=train, opts=opts)
    raise ValueError(f"unknown dataset {name!r} (digits, imagefolder, webdataset, synthetic, synthetic3d or volumes)")
