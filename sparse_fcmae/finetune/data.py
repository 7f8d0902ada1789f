"""Fine-tuning data: the labelled splits, and loaders whose order and augmentation do not depend on the
global RNG (pretraining's seeded sampler and per-sample seeding, or its shard streams), so a resumed run sees what an
uninterrupted one sees."""
from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..data import ResumableSampler, SeededSamples, build_dataset
from ..data.datasets import group_kwargs


def build_splits(cfg: DictConfig):
    """``(train, test, num_classes, in_chans)``: the digits' seeded held-out split, or two image (or volume) folders."""
    d = cfg.data
    if d.name == "webdataset":
        return shard_splits(cfg)
    if d.name in ("imagefolder", "volumes") and not d.val_root:
        raise ValueError(f"data={d.name} needs data.root=<train folder> and data.val_root=<validation folder>")
    # the same switch and keys as pretraining (the split is this function's); no flips for the digits (a mirrored
    # digit is another glyph), volumes flip in training as their group says
    kw = {"name": d.name, "img_size": d.img_size, "in_chans": d.in_chans, "seed": cfg.split_seed, "flip": False,
          **{k: v for k, v in group_kwargs(d).items() if k != "split"}}
    a = cfg.aug
    augment = {"rand_augment": a.rand_augment, "reprob": a.reprob} if cfg.mode == "finetune" else {}
    train = build_dataset(root=d.root, train=True, split="train", augment=augment, **kw)
    test = build_dataset(root=d.val_root, train=False, split="test", augment={"crop_pct": a.crop_pct}, **kw)
    if train.num_classes < 2:
        raise ValueError(f"{cfg.mode} needs labelled data with at least 2 classes; data={d.name} has {train.num_classes}")
    if getattr(train, "classes", None) != getattr(test, "classes", None):
        raise ValueError("data.root and data.val_root have different class folders")
    n_cls, in_chans = train.num_classes, d.in_chans
    if d.max_images:
        g = torch.Generator().manual_seed(cfg.seed)  # a random subset keeps every class
        train = torch.utils.data.Subset(train, torch.randperm(len(train), generator=g)[: d.max_images].tolist())
    if d.max_test_images:
        test = torch.utils.data.Subset(test, range(min(d.max_test_images, len(test))))
    return train, test, n_cls, in_chans


def shard_splits(cfg: DictConfig):
    """``data=webdataset``: the training stream (labels from ``.cls``; linprobe reads each sample once, for its
    feature cache) and the validation shards ``data.val_urls``, each sample once, with the evaluation crop."""
    d, a = cfg.data, cfg.aug
    common = dict(img_size=d.img_size, in_chans=d.in_chans, seed=cfg.seed, crop_scale=tuple(d.crop_scale),
                  npy_layout=d.npy_layout, labels=True, num_classes=d.num_classes)
    augment = {"rand_augment": a.rand_augment, "reprob": a.reprob} if cfg.mode == "finetune" else {}
    train = build_dataset("webdataset", urls=d.urls, epoch_size=d.epoch_size, shuffle_buffer=d.shuffle_buffer,
                          augment=augment, once=cfg.mode == "linprobe", **common)
    if cfg.mode == "finetune":
        if d.max_images:  # at most N samples per epoch, as pretraining
            train.num_images = min(train.num_images, d.max_images)
        if train.num_images < d.batch_size:  # refused before the run folder is made
            raise ValueError(f"data.urls: {train.num_images} training samples per epoch, fewer than "
                             f"data.batch_size={d.batch_size}")
    test = build_dataset("webdataset", urls=d.val_urls, train=False, augment={"crop_pct": a.crop_pct}, once=True,
                         **common)
    return train, test, d.num_classes, d.in_chans


def count(dataset) -> int | None:
    """Images in a split; None for remote shards read once (not counted)."""
    try:
        return len(dataset)
    except TypeError:
        return None


def finetune_batches(dataset, cfg: DictConfig, num_workers: int, drop_last: bool):
    """``(loader, steps per epoch, set_epoch(epoch, micro))``: an image folder's (or the digits') seeded sampler, or
    pretraining's shard streams (``micro`` micro-batches of the epoch already trained are skipped)."""
    bs = cfg.data.batch_size
    if isinstance(dataset, IterableDataset):
        steps = len(dataset) // bs  # >= 1: shard_splits refuses fewer samples than a batch
        dataset.plan(bs, steps, world_size=1, rank=0, streams=max(1, num_workers))
        return loader(dataset, bs, num_workers), steps, dataset.set_epoch
    batches = train_loader(SeededSamples(dataset, cfg.seed, labels=True), cfg, num_workers, drop_last)
    return batches, len(batches), lambda epoch, micro: batches.sampler.set_epoch(epoch, start=micro * bs)


def eval_loader(dataset, batch_size: int, num_workers: int) -> DataLoader:
    """Validation batches: shards read once need no more workers than shards."""
    if isinstance(dataset, IterableDataset):
        num_workers = min(num_workers, len(dataset.urls))
    return loader(dataset, batch_size, num_workers)


class ByIndex(Dataset):
    """Takes the sampler's ``(index, epoch)`` keys for a dataset without augmentation (cached features)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        return self.dataset[key[0]]


def train_loader(dataset: Dataset, cfg: DictConfig, num_workers: int, drop_last: bool) -> DataLoader:
    """Seeded shuffle per epoch (``loader.sampler.set_epoch(epoch, start)`` skips what a resumed run trained on)."""
    sampler = ResumableSampler(dataset, seed=cfg.seed)
    return loader(dataset, cfg.data.batch_size, num_workers, sampler=sampler, drop_last=drop_last)


def loader(dataset: Dataset, batch_size: int, num_workers: int, **kw) -> DataLoader:
    # its own generator: a DataLoader without one draws its workers' base seed from the global torch RNG
    # each time it is iterated, which a resumed run would replay at another point of the stream
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, generator=torch.Generator(), **kw)


def unpack(batch) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(x, y, unreadable files)`` of a batch (image folders count files they had to skip). Shards read once mark a
    corrupt sample with label -1 (counted in the third): it is dropped here, never scored nor trained on."""
    x, y, n = batch[0], batch[1], int(batch[2].sum()) if len(batch) > 2 else 0
    keep = y >= 0
    if not bool(keep.all()):
        x, y = x[keep], y[keep]
    return x, y, n


@torch.no_grad()
def pooled_features(model: nn.Module, dataset: Dataset, cfg: DictConfig, num_workers: int, device,
                    skipped: list) -> tuple[torch.Tensor, torch.Tensor]:
    """linprobe: the frozen encoder's pooled features of every sample, in order (augmentation seeded per sample)."""
    model.eval()
    feats, labels = [], []
    if isinstance(dataset, IterableDataset):  # shards, each sample read once
        batches = eval_loader(dataset, cfg.data.batch_size, num_workers)
    else:
        batches = loader(SeededSamples(dataset, cfg.seed, labels=True), cfg.data.batch_size, num_workers)
    for batch in batches:
        x, y, n = unpack(batch)
        skipped[0] += n
        if not len(y):
            continue
        feats.append(model.forward_head(model.forward_features(x.to(device)), pre_logits=True).cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)
