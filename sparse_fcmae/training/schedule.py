"""The optimiser's schedule and parameter groups, shared by pretraining and fine-tuning."""
from __future__ import annotations

import math

import torch

NO_DECAY_SUFFIXES = (".bias", "grn.gamma", "grn.beta", "mask_token")


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
