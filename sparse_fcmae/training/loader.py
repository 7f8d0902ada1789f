"""Pretraining's data: the dataset a config names, its seeded loader, and where each epoch starts (resume)."""
from __future__ import annotations

import dataclasses

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Subset

from ..data import ResumableSampler, SeededSamples, build_dataset, loader_workers
from ..data.datasets import group_kwargs
from .runtime import plural


@dataclasses.dataclass
class TrainData:
    loader: DataLoader
    samples: object  # ``samples[i]`` -> ``(image, ...)``: the fixed samples of the reconstruction panels
    num_images: int  # images (or volumes) per epoch, all processes
    steps_per_epoch: int
    set_epoch: object  # ``set_epoch(epoch, micro)``: the epoch's order, ``micro`` micro-batches of it already done
    geometry: dict  # what else the order depends on: a checkpoint written with other values restarts its epoch


def build_train_data(cfg: DictConfig, denv, device: torch.device) -> TrainData:
    dataset = build_dataset(cfg.data.name, cfg.data.img_size, cfg.data.in_chans, cfg.data.root, seed=cfg.seed,
                            **group_kwargs(cfg.data))
    batch, accum = cfg.data.batch_size, cfg.optim.accum_steps
    eff_batch = batch * accum * denv.world_size
    workers = loader_workers(cfg.data.num_workers)
    if cfg.data.name == "webdataset":
        if cfg.data.get("max_images"):
            dataset.num_images = min(dataset.num_images, cfg.data.max_images)
        steps = dataset.num_images // eff_batch
        _check_steps(steps, dataset.num_images, batch, accum, denv.world_size)
        dataset.plan(batch, steps * accum, denv.world_size, denv.rank, max(1, workers))
        loader = DataLoader(dataset, batch_size=batch, num_workers=workers, pin_memory=device.type == "cuda")
        return TrainData(loader, dataset, dataset.num_images, steps,
                         lambda epoch, micro: dataset.set_epoch(epoch, micro), {"loader_streams": max(1, workers)})
    if cfg.data.get("max_images"):
        dataset = Subset(dataset, range(min(cfg.data.max_images, len(dataset))))
    samples = SeededSamples(dataset, cfg.seed)
    sampler = ResumableSampler(samples, num_replicas=denv.world_size, rank=denv.rank, seed=cfg.seed)
    steps = sampler.num_samples // (batch * accum)
    _check_steps(steps, len(dataset), batch, accum, denv.world_size)
    loader = DataLoader(samples, batch_size=batch, sampler=sampler, drop_last=True, num_workers=workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed))
    return TrainData(loader, samples, len(dataset), steps,
                     lambda epoch, micro: sampler.set_epoch(epoch, start=micro * batch), {})


def _check_steps(steps: int, n: int, batch: int, accum: int, world: int) -> None:
    if steps < 1:
        raise ValueError(f"dataset has {plural(n, 'image')}, fewer than one optimizer step needs "
                         f"(batch {batch} x accum {accum} x {world} process(es) = {batch * accum * world})")
