"""Image transforms on tensors: the FCMAE crop and flip, timm's RandAugment and RandomErasing, the evaluation crop."""
from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


def _clamp01(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(0.0, 1.0)


def _fcmae_transform(img_size: int, in_chans: int, train: bool, crop_scale=(0.2, 1.0), mean=None, std=None,
                    rand_augment: str | None = None, reprob: float = 0.0, crop_pct: float = 1.0):
    """Tensor transform. Training: RandomResizedCrop (bicubic) + horizontal flip [+ timm RandAugment], per-channel
    normalisation [+ timm RandomErasing]; evaluation: resize to ``img_size / crop_pct`` and centre crop."""
    from torchvision.transforms import v2

    if mean is None:
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else ((0.5,) * in_chans, (0.5,) * in_chans)
    bicubic = v2.InterpolationMode.BICUBIC
    if train:
        geo = [v2.RandomResizedCrop(img_size, scale=tuple(crop_scale), interpolation=bicubic, antialias=True),
               v2.RandomHorizontalFlip()]
        if rand_augment:
            geo.append(TimmRandAugment(rand_augment, img_size, in_chans, mean))
    else:
        geo = [v2.Resize(int(img_size / crop_pct), interpolation=bicubic, antialias=True), v2.CenterCrop(img_size)]
    # bicubic overshoots slightly: clamp back to the file's range before normalising
    tail = [v2.Lambda(_clamp01), v2.Normalize(list(mean), list(std))]
    if train and reprob > 0:
        from timm.data.random_erasing import RandomErasing

        tail.append(RandomErasing(reprob, mode="pixel", device="cpu"))  # on the normalised image, as timm does
    return v2.Compose(geo + tail)


class TimmRandAugment:
    """timm's RandAugment (a policy string such as ``rand-m9-mstd0.5-inc1``) on a ``[0, 1]`` float image tensor:
    it works on PIL images, so 1- or 3-channel tensors only (grayscale or RGB)."""

    def __init__(self, policy: str, img_size: int, in_chans: int, mean):
        from timm.data.auto_augment import rand_augment_transform

        if in_chans not in (1, 3):
            raise ValueError(f"aug.rand_augment works on grayscale or RGB images (PIL), not {in_chans} channels")
        fill = tuple(round(255 * m) for m in mean)
        self.op = rand_augment_transform(policy, {"translate_const": int(img_size * 0.45),
                                                  "img_mean": fill if in_chans == 3 else fill[0]})

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.functional import pil_to_tensor, to_pil_image

        pil = to_pil_image((img.clamp(0, 1) * 255).round().to(torch.uint8))
        return pil_to_tensor(self.op(pil)).to(img.dtype) / 255
