"""One epoch of FCMAE pretraining (MAE-style: plain, readable, one function per step)."""
from __future__ import annotations

import contextlib
import math
import signal
import time

import torch

from .. import distributed as du
from ..masking import random_patch_mask
from ..preemption import Preempted
from .runtime import memory_gb
from .schedule import lr_at
from .state import Progress

# autocast dtype per precision; fp16 (GPUs without bf16: V100, T4) also scales the loss (GradScaler). The
# sparse GRN accumulates its norms in fp32 and autocast runs LayerNorm in fp32, whatever the precision.
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def train_one_epoch(model, loader, optimizer, epoch, cfg, steps_per_epoch, base_lr, device, bar, *, prog: Progress,
                    mask_gen: torch.Generator, denv: du.DistEnv, on_step=None, scaler=None, stop=None) -> float:
    """One epoch (or its remainder after a resume) of ``steps_per_epoch`` optimizer steps.

    Each optimizer step sums ``accum_steps`` micro-batches; masks come from ``mask_gen``, drawn
    for the global micro-batch so that every rank takes its own rows (same masks as one process).
    """
    model.train()
    accum = cfg.optim.accum_steps
    warmup = cfg.optim.warmup_epochs * steps_per_epoch
    total_steps = cfg.optim.epochs * steps_per_epoch
    grid = (cfg.data.img_size // 32,) * cfg.model.spatial_dims  # square images or cubic volumes
    amp_dtype = AMP_DTYPES[cfg.precision]
    amp = torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None)
    scaler = scaler if scaler is not None else torch.amp.GradScaler(device.type, enabled=False)
    eff_batch = cfg.data.batch_size * accum * denv.world_size
    micro_total = steps_per_epoch * accum
    batches = iter(loader)
    t_last = time.perf_counter()
    while prog.micro < micro_total:
        imgs, skipped = next(batches)
        step, k = epoch * steps_per_epoch + prog.micro // accum, prog.micro % accum
        if k == 0:
            lr = lr_at(step, base_lr, cfg.optim.min_lr, warmup, total_steps)
            for g in optimizer.param_groups:
                g["lr"] = lr
            step_loss = 0.0
        imgs = imgs.to(device, non_blocking=True)
        b = imgs.shape[0]
        mask = random_patch_mask(b * denv.world_size, grid, cfg.mask_ratio, generator=mask_gen)[denv.rank :: denv.world_size]
        mask = mask.to(device, non_blocking=True)
        last_micro = k == accum - 1
        sync = model.no_sync() if denv.enabled and not last_micro else contextlib.nullcontext()
        with sync:
            with amp:
                loss, _, _ = model(imgs, mask)
            # one all-reduce gives the global loss (for logging) and a NaN check every rank agrees on
            # ... and whether any rank was asked to stop (SIGTERM/SIGUSR1): all stop after the same step
            asked = float(stop.signum if stop is not None else 0)
            stats = du.all_reduce_sum(torch.stack([loss.detach().float(), skipped.sum().float().to(loss.device),
                                                   loss.detach().float().new_full((), asked)]))
            global_loss = stats[0].item() / denv.world_size
            if not math.isfinite(global_loss):
                raise FloatingPointError(f"loss is {global_loss} at epoch {epoch} step {step}: stopping; the last good "
                                         "checkpoint is kept (lower the lr, enable optim.clip_grad, or use precision=fp32)")
            scaler.scale(loss / accum).backward()
        prog.skipped += int(stats[1].item())
        step_loss += global_loss / accum
        prog.micro += 1
        if not last_micro:
            continue
        grad_norm = None
        if cfg.optim.clip_grad:
            scaler.unscale_(optimizer)  # clip the true gradients (a no-op unless fp16)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad))
        scaler.step(optimizer)  # fp16: skipped when the scaled gradients overflowed
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        prog.loss_sum += step_loss
        prog.loss_count += 1
        now = time.perf_counter()
        img_s = eff_batch / max(now - t_last, 1e-9)
        t_last = now
        bar.set_postfix(epoch=epoch, loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{img_s:.1f}", refresh=False)
        bar.update(1)
        if on_step is not None:
            metrics = {"train/loss": step_loss, "train/lr": lr, "train/img_per_s": img_s,
                       "train/visible_fraction": 1.0 - float(mask.mean()), "train/memory_gb": memory_gb(device),
                       "train/epoch": epoch + prog.micro / micro_total, "data/skipped_files": prog.skipped}
            if grad_norm is not None:
                metrics["train/grad_norm"] = grad_norm
            on_step(step + 1, metrics)
        if stats[2].item() > 0:
            raise Preempted(stop.signum or int(signal.SIGTERM))
    return prog.loss_sum / max(prog.loss_count, 1)
