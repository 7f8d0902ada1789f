"""Data, in the order it flows: ``decode`` (one file -> a tensor, the channel rule), ``transforms`` (crops, flips,
timm's augmentations), ``folders`` (image folders that survive bad files), ``datasets`` (the digits, synthetic
images, and ``build_dataset``: the one switch pretraining and fine-tuning share), ``order`` (seeded sampling and
resume), ``volumes`` (procedural volumes and NIfTI / .npy volume folders, ``model.spatial_dims=3``)."""
from .datasets import DigitsDataset, SyntheticDataset, build_dataset
from .decode import NPY_EXTENSIONS, NPY_LAYOUTS, NpyLayoutError, load_image_chw, npy_channels_first
from .folders import IMAGE_EXTENSIONS, RobustImageFolder, image_folder
from .order import ResumableSampler, SeededSamples, loader_workers, sample_seed
from .transforms import IMAGENET_MEAN, IMAGENET_STD, TimmRandAugment, _fcmae_transform  # noqa: F401

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "NPY_EXTENSIONS", "NPY_LAYOUTS", "DigitsDataset", "NpyLayoutError",
    "ResumableSampler", "RobustImageFolder", "SeededSamples", "SyntheticDataset", "TimmRandAugment", "build_dataset",
    "image_folder", "load_image_chw", "loader_workers", "npy_channels_first", "sample_seed",
]
