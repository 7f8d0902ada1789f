"""One fine-tuning epoch (or its remainder after a resume), one step, and top-1 evaluation."""
from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from ..preemption import Preempted
from ..training.schedule import lr_at
from ..training.state import Progress
from .data import unpack


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, skipped: list | None = None, scored: list | None = None) -> float:
    """Top-1 accuracy (%); unreadable files read are added to ``skipped[0]``, the images scored set in ``scored[0]``."""
    model.eval()
    correct = total = 0
    for batch in loader:
        x, y, n = unpack(batch)
        if skipped is not None:
            skipped[0] += n
        if len(y):
            correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
            total += y.numel()
    if scored is not None:
        scored[0] = total
    return 100.0 * correct / max(total, 1)


def train_step(model, x, y, optimizer, criterion, clip_grad=None) -> float:
    model.train()
    loss = criterion(model(x), y)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()}; stopping")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad:
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    return loss.item()


def set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)  # layer-wise decay scales each group


def train_epoch(net, loader, optimizer, criterion, cfg: DictConfig, prog: Progress, steps_per_epoch: int,
                base_lr: float, device, *, mixup=None, ema=None, model=None, stop=None) -> float:
    """The steps of epoch ``prog.epoch`` not yet done (``prog.micro`` of them are); returns the epoch's mean loss.
    A stop asked for (SIGTERM/SIGUSR1 via ``stop``) raises :class:`Preempted` between two steps."""
    warmup, total = cfg.optim.warmup_epochs * steps_per_epoch, cfg.optim.epochs * steps_per_epoch
    batches = iter(loader)
    while prog.micro < steps_per_epoch:
        if stop is not None and stop.signum:  # checked before each step: the one in flight always finishes
            raise Preempted(stop.signum)
        x, y, n = unpack(next(batches))
        prog.skipped += n
        x, y = x.to(device), y.to(device)
        if mixup is not None:
            x, y = mixup(x, y)  # mixed images, soft targets (numpy's global RNG)
        step = prog.epoch * steps_per_epoch + prog.micro
        set_lr(optimizer, lr_at(step, base_lr, cfg.optim.min_lr, warmup, total))
        prog.loss_sum += train_step(net, x, y, optimizer, criterion, cfg.optim.clip_grad)
        prog.loss_count += 1
        if ema is not None:
            ema.update(model, step=step)
        prog.micro += 1
    return prog.loss_sum / max(prog.loss_count, 1)
