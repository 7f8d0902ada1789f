"""Reproducible data order: seeded per-sample augmentation, a resumable (distributed) sampler, worker counts."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler


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


@contextlib.contextmanager
def seeded_rngs(seed: int):
    """torch, numpy and python RNGs seeded with ``seed`` inside the block, restored after it: loading never
    disturbs training randomness (one sample's augmentation runs inside)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class SeededSamples(Dataset):
    """Wraps a dataset so that sample ``(index, epoch)`` is augmented with its own seeded RNG.

    The global RNG states are restored afterwards, so loading never disturbs training randomness,
    and the same sample gets the same crop/flip whatever the number of workers or processes:
    this is what makes resumed and DDP runs match uninterrupted single-process ones.
    Returns ``(image, n_skipped)``, or ``(image, label, n_skipped)`` with ``labels=True`` (fine-tuning).
    """

    def __init__(self, dataset: Dataset, seed: int, labels: bool = False):
        self.dataset, self.seed, self.labels = dataset, seed, labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, -1)
        with seeded_rngs(sample_seed(self.seed, epoch, index)):
            out = self.dataset[index]
        skipped = out[2] if len(out) > 2 else 0
        return (out[0], out[1], skipped) if self.labels else (out[0], skipped)


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
