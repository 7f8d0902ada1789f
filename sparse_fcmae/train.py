"""FCMAE pretraining loop (MAE-style: plain, readable, one function per step)."""
from __future__ import annotations

import math
import pathlib
import random
import time

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from .checkpoint import atomic_write, save_checkpoint
from .data import build_dataset
from .models import FCMAE
from .visualize import reconstruction_panel, save_png

NO_DECAY_SUFFIXES = (".bias", "grn.gamma", "grn.beta", "mask_token")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but torch sees no GPU")
    return torch.device(name)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norm weights, GRN gamma/beta and the mask token."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(NO_DECAY_SUFFIXES) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: float, base_lr: float, min_lr: float, warmup_steps: float, total_steps: float) -> float:
    """Linear warm-up, then half-cosine to ``min_lr``."""
    if step < warmup_steps:
        return base_lr * step / max(warmup_steps, 1)
    t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def validate_config(cfg: DictConfig) -> None:
    if not 0.0 <= cfg.mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {cfg.mask_ratio}")
    if cfg.data.img_size % 32:
        raise ValueError(f"data.img_size must be divisible by 32, got {cfg.data.img_size}")
    if cfg.data.batch_size < 1 or cfg.optim.epochs < 1:
        raise ValueError("data.batch_size and optim.epochs must be >= 1")


def build_model(cfg: DictConfig) -> FCMAE:
    return FCMAE(
        size=cfg.model.name,
        in_chans=cfg.data.in_chans,
        mask_ratio=cfg.mask_ratio,
        decoder_depth=cfg.model.decoder_depth,
        decoder_dim=cfg.model.decoder_dim,
        norm_pix_loss=cfg.norm_pix_loss,
        drop_path_rate=cfg.model.drop_path_rate,
        encoder=cfg.model.encoder,
    )


def make_run_dir(cfg: DictConfig) -> pathlib.Path:
    if cfg.run_dir:
        run_dir = pathlib.Path(cfg.run_dir)
    else:
        run_dir = pathlib.Path(cfg.out_dir) / time.strftime("pretrain-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    text = OmegaConf.to_yaml(cfg, resolve=True)
    atomic_write(run_dir / "config.yaml", lambda f: f.write(text.encode()))
    return run_dir


@torch.no_grad()
def save_reconstructions(model: FCMAE, dataset, n: int, path: pathlib.Path, device: torch.device, seed: int) -> None:
    model.eval()
    imgs = torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))]).to(device)
    mask = model.random_masking(imgs, torch.Generator(device=imgs.device).manual_seed(seed))
    _, pred, mask = model(imgs, mask)
    save_png(reconstruction_panel(imgs.cpu(), mask.cpu(), model.reconstruct(pred, imgs).cpu()), path)
    model.train()


def train_one_epoch(model, loader, optimizer, epoch, cfg, steps_per_epoch, base_lr, device, bar) -> float:
    model.train()
    total, count = 0.0, 0
    warmup = cfg.optim.warmup_epochs * steps_per_epoch
    total_steps = cfg.optim.epochs * steps_per_epoch
    for it, (imgs, _) in enumerate(loader):
        step = epoch * steps_per_epoch + it
        lr = lr_at(step, base_lr, cfg.optim.min_lr, warmup, total_steps)
        for g in optimizer.param_groups:
            g["lr"] = lr
        imgs = imgs.to(device, non_blocking=True)
        t0 = time.perf_counter()
        loss, _, _ = model(imgs)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch} step {it}; stopping (last good checkpoint kept)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        optimizer.step()
        total += loss.item() * imgs.shape[0]
        count += imgs.shape[0]
        bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", img_s=f"{imgs.shape[0] / (time.perf_counter() - t0):.1f}")
        bar.update(1)
    return total / max(count, 1)


def pretrain(cfg: DictConfig) -> dict:
    """Run FCMAE pretraining; returns a summary with the run folder and per-epoch losses."""
    validate_config(cfg)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    dataset = build_dataset(cfg.data.name, cfg.data.img_size, cfg.data.in_chans, cfg.data.root, seed=cfg.seed,
                            split=cfg.data.get("split", "all"))
    if cfg.data.get("max_images"):
        dataset = torch.utils.data.Subset(dataset, range(min(cfg.data.max_images, len(dataset))))
    if len(dataset) < cfg.data.batch_size:
        raise ValueError(f"dataset has {len(dataset)} images, fewer than one batch ({cfg.data.batch_size})")
    loader = DataLoader(
        dataset,
        batch_size=cfg.data.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=cfg.data.num_workers,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    model = build_model(cfg).to(device)
    base_lr = cfg.optim.lr or cfg.optim.blr * cfg.data.batch_size / 256
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=base_lr, betas=tuple(cfg.optim.betas))
    run_dir = make_run_dir(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[pretrain] {cfg.model.name} ({cfg.model.encoder} encoder, {n_params / 1e6:.2f}M params) on {cfg.data.name} "
          f"({len(dataset)} images, {cfg.data.img_size}px, {cfg.data.in_chans} ch), mask {cfg.mask_ratio}, "
          f"{cfg.optim.epochs} epochs, device {device}, run folder {run_dir}")

    steps_per_epoch = len(loader)
    losses = []
    with tqdm(total=cfg.optim.epochs * steps_per_epoch, desc="pretrain", unit="step", dynamic_ncols=True, mininterval=1.0) as bar:
        for epoch in range(cfg.optim.epochs):
            losses.append(train_one_epoch(model, loader, optimizer, epoch, cfg, steps_per_epoch, base_lr, device, bar))
            bar.write(f"[pretrain] epoch {epoch + 1}/{cfg.optim.epochs}: mean loss {losses[-1]:.4f}")
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "config": OmegaConf.to_container(cfg, resolve=True),
                "losses": losses,
            }
            save_checkpoint(state, run_dir / "checkpoint-last.pth")
    panel = run_dir / "reconstruction.png"
    save_reconstructions(model, dataset, cfg.panels, panel, device, cfg.seed)
    print(f"[pretrain] done: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    print(f"[pretrain] checkpoint: {run_dir / 'checkpoint-last.pth'}")
    print(f"[pretrain] reconstructions (original | masked | reconstruction): {panel}")
    return {"run_dir": run_dir, "losses": losses, "checkpoint": run_dir / "checkpoint-last.pth", "panel": panel}
