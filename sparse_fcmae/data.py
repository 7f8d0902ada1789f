"""Datasets: the embedded digits (no download), and image folders."""
from __future__ import annotations

import pathlib

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


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


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_folder(root: str, img_size: int, in_chans: int = 3, train: bool = True):
    """A torchvision ImageFolder with the FCMAE augmentation (random resized crop 0.2-1, flip)."""
    from torchvision import datasets, transforms

    path = pathlib.Path(root)
    if not path.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    if in_chans not in (1, 3):
        raise ValueError(f"image folders support in_chans 1 (grayscale) or 3 (RGB), got {in_chans}")
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else ((0.5,), (0.5,))
    aug = (
        [transforms.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
         transforms.RandomHorizontalFlip()]
        if train
        else [transforms.Resize(img_size), transforms.CenterCrop(img_size)]
    )
    convert = [transforms.Grayscale(1)] if in_chans == 1 else [transforms.Lambda(lambda im: im.convert("RGB"))]
    tf = transforms.Compose(convert + aug + [transforms.ToTensor(), transforms.Normalize(mean, std)])
    ds = datasets.ImageFolder(str(path), transform=tf)
    ds.in_chans = in_chans
    return ds


def build_dataset(name: str, img_size: int, in_chans: int, root: str | None = None, seed: int = 0, train: bool = True,
                  split: str = "all"):
    if img_size % 32:
        raise ValueError(f"img_size must be divisible by 32, got {img_size}")
    if name == "digits":
        if in_chans != 1:
            raise ValueError(f"the digits are grayscale: in_chans must be 1, got {in_chans}")
        return DigitsDataset(img_size, split=split, seed=seed, flip=train)
    if name == "imagefolder":
        if not root:
            raise ValueError("data=imagefolder needs data.root=/path/to/images")
        return image_folder(root, img_size, in_chans, train=train)
    raise ValueError(f"unknown dataset {name!r} (digits or imagefolder)")
