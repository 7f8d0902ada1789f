"""Volumes (``model.spatial_dims=3``): procedural volumes, and folders of NIfTI (``.nii``, ``.nii.gz``, read by
nibabel) and ``.npy`` volumes whose unreadable files are skipped and counted like an image folder's.

Items are ``(volume (C, S, S, S), label[, skipped])`` with ``S = img_size`` (the edge of a cubic volume,
divisible by 32), like the image datasets' ``(image (C, S, S), label[, skipped])``.
"""
from __future__ import annotations

import math
import pathlib

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .folders import SkippingFolder

VOLUME_DATASETS = ("synthetic3d", "volumes")  # the data= choices that give volumes (model.spatial_dims=3)
VOLUME_EXTENSIONS = (".nii", ".nii.gz", ".npy")
VOLUME_NPY_LAYOUTS = ("auto", "cdhw", "dhwc")
NORMALIZATIONS = ("zscore", "minmax", "none")


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


class VolumeSettingError(ValueError):
    """A volume that contradicts the settings (its channel count, an ambiguous ``.npy`` layout): a setting to
    fix, never a file to skip."""


def is_volume_file(path: pathlib.Path) -> bool:
    return path.is_file() and path.name.lower().endswith(VOLUME_EXTENSIONS)


def channels_last(shape: tuple, path: str, in_chans: int, npy_layout: str = "auto") -> bool:
    """Whether a file's array of ``shape`` keeps its channels on the last axis (then moved first), checking the
    channel rule: 3D ``(D, H, W)`` is one channel; 4D NIfTI keeps extra values per voxel (modalities, time) on the
    last axis; a 4D ``.npy`` is ``(C, D, H, W)`` or ``(D, H, W, C)`` (``npy_layout``; ``auto``: the end axis whose
    size is ``in_chans``). The channel count must be ``in_chans`` (``VolumeSettingError`` otherwise)."""
    if len(shape) not in (3, 4) or min(shape) < 1:
        raise ValueError(f"not a 3D volume: array of shape {tuple(shape)}")
    last = len(shape) == 4  # NIfTI
    if len(shape) == 4 and path.lower().endswith(".npy"):
        first, end = shape[0] == in_chans, shape[-1] == in_chans
        if npy_layout != "auto":
            last = npy_layout == "dhwc"
        elif first == end:
            what = "cannot tell whether" if first else "neither end axis of size data.in_chans says whether"
            raise VolumeSettingError(
                f"{path}: {what} the {tuple(shape)} array is (C, D, H, W) or (D, H, W, C) with data.in_chans="
                f"{in_chans}; set data.npy_layout=cdhw or data.npy_layout=dhwc (or data.in_chans)")
        else:
            last = end
    chans = 1 if len(shape) == 3 else shape[-1] if last else shape[0]
    if chans != in_chans:
        raise VolumeSettingError(f"{path} has {chans} channel(s), data.in_chans={in_chans}: set data.in_chans={chans} "
                                 "(every volume must have the same channels)")
    return last


def volume_shape(path: str) -> tuple:
    """A file's array shape from its header alone (nothing else is read)."""
    if path.lower().endswith(".npy"):
        return np.load(path, mmap_mode="r", allow_pickle=False).shape
    import nibabel as nib

    return nib.load(path).shape


def load_volume(path: str, in_chans: int, npy_layout: str = "auto") -> torch.Tensor:
    """One file -> a float32 ``(C, D, H, W)`` tensor: NIfTI through nibabel (``get_fdata``: the header's scaling
    applied), ``.npy`` as stored; axes and the channel rule by ``channels_last``; non-finite values refused."""
    if path.lower().endswith(".npy"):
        arr = np.load(path, allow_pickle=False)
    else:
        import nibabel as nib

        arr = np.asarray(nib.load(path).get_fdata(dtype=np.float32))
    if channels_last(arr.shape, path, in_chans, npy_layout):
        arr = np.moveaxis(arr, -1, 0)
    vol = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if vol.ndim == 3:
        vol = vol[None]
    if not torch.isfinite(vol).all():
        raise ValueError("non-finite voxel values (NaN or inf)")
    return vol


class VolumeTransform:
    """Intensity clipping -> normalisation (per channel) -> a cubic crop of edge ``img_size`` (padded with each
    channel's minimum where the volume is smaller; random in training, centred otherwise) -> random flips
    along each axis (training). Random draws use torch's global generator, which ``SeededSamples`` seeds per
    sample: the same crop and flips whatever the workers or processes."""

    def __init__(self, img_size: int, train: bool, opts: dict):
        self.size, self.train = img_size, train
        self.clip, self.percentiles = (None if opts[k] is None else tuple(opts[k]) for k in ("clip", "clip_percentiles"))
        self.normalize, self.flip = opts["normalize"], bool(opts["flip"]) and train

    def __call__(self, vol: torch.Tensor) -> torch.Tensor:
        c = vol.shape[0]
        if self.clip is not None:
            vol = vol.clamp(*self.clip)
        elif self.percentiles is not None:
            lo, hi = np.percentile(vol.reshape(c, -1).numpy(), list(self.percentiles), axis=1)
            vol = torch.maximum(torch.minimum(vol, torch.from_numpy(hi).float().view(c, 1, 1, 1)),
                                torch.from_numpy(lo).float().view(c, 1, 1, 1))
        flat = vol.reshape(c, -1)
        if self.normalize == "zscore":
            vol = (vol - flat.mean(1).view(c, 1, 1, 1)) / flat.std(1).clamp_min(1e-6).view(c, 1, 1, 1)
        elif self.normalize == "minmax":
            lo, hi = flat.amin(1).view(c, 1, 1, 1), flat.amax(1).view(c, 1, 1, 1)
            vol = (vol - lo) / (hi - lo).clamp_min(1e-6)
        s = self.size
        short = [max(0, s - n) for n in vol.shape[1:]]
        if any(short):  # centred padding, with the background value (each channel's minimum)
            pad = [p for n in reversed(short) for p in (n // 2, n - n // 2)]
            low = vol.reshape(c, -1).amin(1)
            vol = torch.stack([F.pad(vol[i], pad, value=float(low[i])) for i in range(c)])
        starts = [int(torch.randint(0, n - s + 1, ())) if self.train else (n - s) // 2 for n in vol.shape[1:]]
        vol = vol[:, starts[0]:starts[0] + s, starts[1]:starts[1] + s, starts[2]:starts[2] + s]
        if self.flip:
            axes = [1 + a for a in range(3) if torch.rand(()) < 0.5]
            if axes:
                vol = vol.flip(axes)
        return vol.contiguous()


def check_volume_options(opts: dict) -> None:
    """The intensity and layout keys of ``conf/data/volumes.yaml``, checked before anything is read."""
    if opts["normalize"] not in NORMALIZATIONS:
        raise ValueError(f"data.normalize must be zscore, minmax or none, got {opts['normalize']!r}")
    if opts["npy_layout"] not in VOLUME_NPY_LAYOUTS:
        raise ValueError(f"data.npy_layout must be auto, cdhw or dhwc for volumes, got {opts['npy_layout']!r}")
    if opts["clip"] is not None and opts["clip_percentiles"] is not None:
        raise ValueError("set data.clip (intensities) or data.clip_percentiles, not both")
    for key, low, high in (("clip", -math.inf, math.inf), ("clip_percentiles", 0.0, 100.0)):
        v = opts[key]
        if v is None:
            continue
        ok = (len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
              and low <= v[0] < v[1] <= high)
        if not ok:
            bounds = "" if key == "clip" else " within [0, 100]"
            raise ValueError(f"data.{key} must be [low, high] with low < high{bounds}, got {list(v)}")


class VolumeFolder(SkippingFolder):
    """``root/<file>`` (unlabelled: every label 0) or ``root/<class>/<file>`` (labels: the sorted class folders,
    as torchvision's ``ImageFolder``) of ``.nii``, ``.nii.gz`` and ``.npy`` volumes; unreadable files skipped
    and counted (``SkippingFolder``)."""

    kind = "volume"
    fatal = (VolumeSettingError,)

    def __init__(self, root: str, img_size: int, in_chans: int, train: bool, opts: dict):
        path = pathlib.Path(root)
        if not path.is_dir():
            raise FileNotFoundError(f"data folder not found: {root}")
        check_volume_options(opts)
        flat = sorted(f for f in path.iterdir() if is_volume_file(f))
        self.classes = sorted(d.name for d in path.iterdir() if d.is_dir() and any(map(is_volume_file, d.iterdir())))
        if flat and self.classes:
            raise ValueError(f"data folder {root} holds volumes beside class folders of volumes: use root/<file> "
                             "(unlabelled) or root/<class>/<file>, not both")
        if self.classes:
            self.samples = [(str(f), i) for i, c in enumerate(self.classes)
                            for f in sorted(p for p in (path / c).iterdir() if is_volume_file(p))]
        else:
            self.samples = [(str(f), 0) for f in flat]
        if not self.samples:
            raise FileNotFoundError(f"no volumes found in data folder {root}: expected .nii, .nii.gz or .npy files "
                                    "in root/ or root/<class>/")
        self.num_classes = max(1, len(self.classes))
        self.in_chans, self.npy_layout = in_chans, opts["npy_layout"]
        self._check_channels()
        self._check_one_readable(root)
        self.transform = VolumeTransform(img_size, train, opts)
        self._init_warnings()

    def _check_channels(self) -> None:
        """Every file's channel count from its header, before anything starts (a mismatch met mid-run, inside a
        DataLoader worker, would stop the run later and less clearly). Unreadable headers: skipped later."""
        for path, _ in self.samples:
            try:
                shape = volume_shape(path)
            except Exception:
                continue
            try:
                channels_last(shape, path, self.in_chans, self.npy_layout)
            except VolumeSettingError:
                raise
            except ValueError:  # not a volume: skipped and counted later, like any bad file
                continue

    def load(self, path: str) -> torch.Tensor:
        return load_volume(path, self.in_chans, self.npy_layout)
