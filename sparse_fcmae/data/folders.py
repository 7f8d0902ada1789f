"""Image folders (``root/<class>/<image>``) whose unreadable files are skipped and counted, never fatal."""
from __future__ import annotations

import pathlib
import sys

import numpy as np
import torch
from torch.utils.data import Dataset

from .decode import NPY_EXTENSIONS, NPY_LAYOUTS, NpyLayoutError, load_image_chw, npy_channels_first
from .transforms import _fcmae_transform

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp") + NPY_EXTENSIONS


def _has_image_extension(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _path_only(path: str) -> str:  # files are decoded lazily, in __getitem__, where failures are caught
    return path


class SkippingFolder(Dataset):
    """Files read lazily, a file that fails to read replaced by the next readable one (so batches keep their
    size and every DDP rank its step count); ``__getitem__`` returns ``(item, label, skipped)`` with ``skipped``
    1 when file ``i`` itself was unreadable, so an epoch counts each bad file once. Each bad file is named once
    per run (the first ``MAX_WARNINGS``), whatever the number of workers. Subclasses set ``samples`` (``(path,
    label)`` pairs), ``kind`` (the word the warning uses), ``fatal`` (errors that are settings to fix, never files
    to skip), ``load(path)`` and ``transform``, then call ``_init_warnings``."""

    MAX_WARNINGS = 10
    kind = "file"
    fatal: tuple[type[BaseException], ...] = ()
    samples: list

    def _init_warnings(self) -> None:
        # 1 = already reported. Shared memory: DataLoader workers (new ones every epoch) all see it
        self._warned = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()

    def load(self, path: str):
        raise NotImplementedError

    def _check_one_readable(self, root) -> None:
        """Fail before anything is written when no file reads (reads files until one does: usually one)."""
        for path, _ in self.samples:
            try:
                self.load(path)
                return
            except self.fatal:
                raise
            except Exception:  # reported, skipped and counted later, like any bad file
                continue
        raise ValueError(f"no readable {self.kind} in data folder {root} ({len(self.samples)} files tried)")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        n = len(self)
        for k in range(n):
            path, label = self.samples[(i + k) % n]
            try:
                item = self.load(path)
            except self.fatal:
                raise
            except Exception as e:  # corrupt, truncated, foreign: skip the file, keep training
                if k == 0:  # reported by the one request for file i itself (once per epoch): no two workers race
                    self._warn_once((i + k) % n, path, e)
                continue
            return self.transform(item), label, int(k > 0)  # 1: the requested file was skipped
        raise RuntimeError(f"no readable {self.kind} in the data folder ({n} files tried)")

    def _warn_once(self, i: int, path: str, e: Exception) -> None:
        if self._warned[i]:
            return
        self._warned[i] = 1
        if int(self._warned.sum()) <= self.MAX_WARNINGS:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"warning: skipping unreadable {self.kind} {path}: {why}", file=sys.stderr)


class RobustImageFolder(SkippingFolder):
    """torchvision ``ImageFolder`` whose unreadable files are skipped, counted, and never fatal (``SkippingFolder``)."""

    kind = "image"
    fatal = (NpyLayoutError,)

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
        self.samples = self.folder.samples
        self.in_chans, self.npy_layout = in_chans, npy_layout
        self._check_npy_layout()
        self._check_one_readable(root)
        self.classes = self.folder.classes  # class folder names, sorted: label i is classes[i]
        self.num_classes = len(self.classes)
        self.transform = _fcmae_transform(img_size, in_chans, train, crop_scale, **(augment or {}))
        self._init_warnings()

    def load(self, path: str) -> torch.Tensor:
        return load_image_chw(path, self.in_chans, self.npy_layout)

    def _check_npy_layout(self) -> None:
        """Fail before anything starts when the first .npy file's layout is ambiguous (header only)."""

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


def image_folder(root: str, img_size: int, in_chans: int = 3, train: bool = True, crop_scale=(0.2, 1.0),
                 npy_layout: str = "auto", augment: dict | None = None) -> RobustImageFolder:
    """An image folder with the FCMAE augmentation (random resized crop 0.2-1 bicubic, flip)."""
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    return RobustImageFolder(root, img_size, in_chans, train=train, crop_scale=crop_scale, npy_layout=npy_layout,
                             augment=augment)
