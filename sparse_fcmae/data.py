"""Datasets: the embedded digits (no download), image folders, synthetic images (and volumes); seeded sampling."""
from __future__ import annotations

import pathlib
import random
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, DistributedSampler


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
NPY_EXTENSIONS = (".npy",)
NPY_LAYOUTS = ("auto", "chw", "hwc")


class NpyLayoutError(ValueError):
    """A 3-D ``.npy`` array whose channel axis cannot be told: a setting to fix, never a file to skip."""


def npy_channels_first(shape, in_chans: int, layout: str = "auto", path: str = "") -> bool:
    """Whether a 3-D array is ``(C, H, W)`` (True) or ``(H, W, C)`` (False); no limit on the band count.

    ``auto``: the first/last axis whose size is ``in_chans`` when exactly one of them is; else the smaller
    of the two; equal sizes are ambiguous (``NpyLayoutError``, naming ``data.npy_layout``).
    """
    if layout not in NPY_LAYOUTS:
        raise ValueError(f"data.npy_layout must be auto, chw or hwc, got {layout!r}")
    if layout != "auto":
        return layout == "chw"
    first, last = shape[0], shape[-1]
    if (first == in_chans) != (last == in_chans):
        return first == in_chans
    if first != last:
        return first < last
    raise NpyLayoutError(f"{path}: cannot tell whether the {tuple(shape)} array is (C, H, W) or (H, W, C) "
                         f"with in_chans={in_chans}; set data.npy_layout=chw or data.npy_layout=hwc")


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


def load_image_chw(path: str, in_chans: int, npy_layout: str = "auto") -> torch.Tensor:
    """Read an image file as a float ``(in_chans, H, W)`` tensor in [0, 1].

    The channel rule: 8-bit files scale by 1/255, 16-bit by 1/65535, float files are taken as they are.
    ``in_chans`` 1 -> grayscale (PIL ``L`` conversion, or the channel mean for arrays); 3 -> RGB
    (PIL ``RGB`` conversion). 16-bit and float images are never converted by PIL (it would clip them
    at 255): they are scaled, then replicated. Palette images (``P``, ``PA``) become RGB(A) first, and
    gray + alpha (``LA``) RGBA for counts other than 1 and 3. Any other count -> the file's own channels
    (``.npy`` as ``(H, W, C)`` or ``(C, H, W)``, see ``npy_channels_first``; multi-page-free TIFF/PNG with alpha, ...) repeated
    cyclically up to ``in_chans`` and truncated past it: a 4-band RGBA or RGB+NIR file feeds ``in_chans=4`` unchanged, a grayscale
    file is repeated, a 6-band array keeps its first 4.
    """
    import numpy as np
    from PIL import Image

    if path.lower().endswith(NPY_EXTENSIONS):
        arr = np.load(path, allow_pickle=False)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        elif arr.ndim == 3 and npy_channels_first(arr.shape, in_chans, npy_layout, path):
            arr = arr.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
        if arr.ndim != 3:
            raise ValueError(f"{path}: expected a (H, W), (H, W, C) or (C, H, W) array, got shape {arr.shape}")
    else:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(_decoded_mode(im, in_chans))
        if arr.ndim == 2:
            arr = arr[:, :, None]
    scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(arr.dtype, 1.0)
    if arr.dtype.kind in "iu" and scale == 1.0:  # PIL mode I (32-bit ints): 16-bit data in practice
        scale = 65535.0
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1) / scale
    if x.shape[0] != in_chans:
        if in_chans == 1:
            x = x[:3].mean(0, keepdim=True)
        else:
            x = x.repeat((in_chans + x.shape[0] - 1) // x.shape[0], 1, 1)[:in_chans]
    return x.contiguous()


def _is_high_depth(mode: str) -> bool:
    return mode in ("I", "F") or mode.startswith("I;16")


def _decoded_mode(im, in_chans: int):
    """The PIL image whose array holds intensities (not palette indices) at the file's full depth."""
    if _is_high_depth(im.mode):  # 16-bit / 32-bit / float: convert("L"/"RGB") would clip at 255
        return im  # scaled by 1/65535 (ints) in load_image_chw, then replicated to in_chans
    if im.mode in ("P", "PA"):  # palette indices are not intensities: expand to colours (with alpha if any)
        im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
    if in_chans == 1:
        return im.convert("L")
    if in_chans == 3:
        return im.convert("RGB")
    if im.mode == "LA":  # gray + alpha -> RGBA, as a palette image with alpha
        return im.convert("RGBA")
    return im


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


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp") + NPY_EXTENSIONS


def _has_image_extension(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _path_only(path: str) -> str:  # files are decoded lazily, in __getitem__, where failures are caught
    return path


def _clamp01(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(0.0, 1.0)


class RobustImageFolder(Dataset):
    """torchvision ``ImageFolder`` whose unreadable files are skipped, counted, and never fatal.

    A file that fails to decode is replaced by the next readable one (so batches keep their size
    and every DDP rank its step count); ``__getitem__`` returns ``(image, label, skipped)`` with
    ``skipped`` 1 when file ``i`` itself was unreadable, so an epoch counts each bad file once.
    Each bad file is named once per run (the first ``MAX_WARNINGS``), whatever the number of workers.
    """

    MAX_WARNINGS = 10

    def __init__(self, root: str, img_size: int, in_chans: int = 3, train: bool = True, crop_scale=(0.2, 1.0),
                 npy_layout: str = "auto", augment: dict | None = None):
        from torchvision import datasets

        path = pathlib.Path(root)
        if not path.is_dir():
            raise FileNotFoundError(f"data folder not found: {root}")
        exts = IMAGE_EXTENSIONS
        try:
            self.folder = datasets.ImageFolder(str(path), loader=_path_only, is_valid_file=_has_image_extension)
        except FileNotFoundError:
            flat = any(f.suffix.lower() in exts for f in path.iterdir() if f.is_file())
            hint = " (images must sit in class sub-folders: root/<class>/<image>; one dummy class is fine)" if flat else ""
            raise FileNotFoundError(f"no images found in data folder {root}: expected root/<class>/<image> "
                                    f"with one of {', '.join(sorted(set(e.lower() for e in exts)))}{hint}") from None
        self.in_chans, self.npy_layout = in_chans, npy_layout
        self._check_npy_layout()
        self._check_one_readable(root)
        self.classes = self.folder.classes  # class folder names, sorted: label i is classes[i]
        self.num_classes = len(self.classes)
        self.transform = _fcmae_transform(img_size, in_chans, train, crop_scale, **(augment or {}))
        # 1 = already reported. Shared memory: DataLoader workers (new ones every epoch) all see it
        self._warned = torch.zeros(len(self.folder.samples), dtype=torch.uint8).share_memory_()

    def _check_npy_layout(self) -> None:
        """Fail before anything starts when the first .npy file's layout is ambiguous (header only)."""
        import numpy as np

        if self.npy_layout not in NPY_LAYOUTS:
            raise ValueError(f"data.npy_layout must be auto, chw or hwc, got {self.npy_layout!r}")
        first = next((p for p, _ in self.folder.samples if p.lower().endswith(NPY_EXTENSIONS)), None)
        if first is None:
            return
        try:
            shape = np.load(first, mmap_mode="r", allow_pickle=False).shape
        except Exception:  # unreadable: skipped later like any bad file
            return
        if len(shape) == 3:
            npy_channels_first(shape, self.in_chans, self.npy_layout, first)

    def _check_one_readable(self, root) -> None:
        """Fail before anything is written when no file decodes (reads files until one does: usually one)."""
        for path, _ in self.folder.samples:
            try:
                load_image_chw(path, self.in_chans, self.npy_layout)
                return
            except NpyLayoutError:
                raise
            except Exception:  # reported, skipped and counted later, like any bad file
                continue
        raise ValueError(f"no readable image in data folder {root} ({len(self.folder.samples)} files tried)")

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, i: int):
        n = len(self)
        for k in range(n):
            path, label = self.folder.samples[(i + k) % n]
            try:
                img = load_image_chw(path, self.in_chans, self.npy_layout)
            except NpyLayoutError:
                raise
            except Exception as e:  # corrupt, truncated, foreign: skip the file, keep training
                if k == 0:  # reported by the one request for file i itself (once per epoch): no two workers race
                    self._warn_once((i + k) % n, path, e)
                continue
            return self.transform(img), label, int(k > 0)  # 1: the requested file was skipped
        raise RuntimeError(f"no readable image in the data folder ({n} files tried)")

    def _warn_once(self, i: int, path: str, e: Exception) -> None:
        if self._warned[i]:
            return
        self._warned[i] = 1
        if int(self._warned.sum()) <= self.MAX_WARNINGS:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"warning: skipping unreadable image {path}: {why}", file=sys.stderr)


def image_folder(root: str, img_size: int, in_chans: int = 3, train: bool = True, crop_scale=(0.2, 1.0),
                 npy_layout: str = "auto", augment: dict | None = None) -> RobustImageFolder:
    """An image folder with the FCMAE augmentation (random resized crop 0.2-1 bicubic, flip)."""
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    return RobustImageFolder(root, img_size, in_chans, train=train, crop_scale=crop_scale, npy_layout=npy_layout,
                             augment=augment)


def build_dataset(name: str, img_size: int, in_chans: int, root: str | None = None, seed: int = 0, train: bool = True,
                  num_images: int = 1024, crop_scale=(0.2, 1.0), split: str = "all", flip: bool | None = None,
                  npy_layout: str = "auto", augment: dict | None = None):
    """The one dataset switch (pretraining, fine-tuning, linear probing).

    ``train``: training augmentation (image folders: random resized crop + flip; else resize + centre crop).
    ``split``: the digits' seeded split (an image folder's split is its ``root``). ``flip``: digits only,
    default ``train``. ``npy_layout``: image folders' ``.npy`` axis order. ``augment``: image folders' fine-tuning
    extras (``rand_augment``, ``reprob``, ``crop_pct``; see ``_fcmae_transform``). Every dataset has ``num_classes``;
    items are ``(image, label[, skipped])``.
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
    if name == "synthetic":
        return SyntheticDataset(num_images, img_size, in_chans, seed=seed)
    if name == "synthetic3d":  # volumes (model.spatial_dims=3): data.img_size is the cube's edge
        from .volumes import SyntheticVolumeDataset
        return SyntheticVolumeDataset(num_images, img_size, in_chans, seed=seed)
    raise ValueError(f"unknown dataset {name!r} (digits, imagefolder, synthetic or synthetic3d)")


# ---- reproducible data order and augmentation ----------------------------------------------
def loader_workers(requested: int) -> int:
    """DataLoader workers: the request, capped at the CPUs this process may use (the image-folder default
    of 8 on a 2-core machine only adds processes, and torch warns about it)."""
    import os

    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(int(requested), cpus))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentation, independent of rank, worker and batch size."""
    return int(np.random.SeedSequence([seed, epoch + 1, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class SeededSamples(Dataset):
    """Wraps a dataset so that sample ``(index, epoch)`` is augmented with its own seeded RNG.

    The global RNG states are restored afterwards, so loading never disturbs training randomness,
    and the same sample gets the same crop/flip whatever the number of workers or processes:
    this is what makes resumed and DDP runs match uninterrupted single-process ones.
    Returns ``(image, n_skipped)``.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, -1)
        s = sample_seed(self.seed, epoch, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            random.seed(s)
            np.random.seed(s % 2**32)
            try:
                out = self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
        return out[0], (out[2] if len(out) > 2 else 0)


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that yields ``(index, epoch)`` and can start mid-epoch.

    ``set_epoch(epoch, start)`` skips this rank's first ``start`` samples (the ones a resumed run
    already trained on). With one process it is a plain seeded shuffle.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        indices = list(super().__iter__())[self.start:]
        return iter([(i, self.epoch) for i in indices])

    def __len__(self) -> int:
        return self.num_samples - self.start
