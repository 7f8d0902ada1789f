"""The classifier fine-tuning trains (timm ``convnextv2_<size>``), its optimizer, EMA and Mixup."""
from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from ..optim import fused


def load_timm_weights(path: str) -> tuple[dict[str, torch.Tensor], str, int, str]:
    """Any checkpoint ``sparse-fcmae convert`` reads -> ``(timm state, size, in_chans, source format)``."""
    from ..convert import load_weights

    state, info = load_weights(path, "timm")
    return state, info["size"], info["in_chans"], info["format"]


def build_classifier(cfg: DictConfig, num_classes: int, in_chans: int) -> nn.Module:
    """timm ``convnextv2_<size>``; from ``cfg.weights`` when given (its size must match ``cfg.model.name``)."""
    if cfg.model.spatial_dims == 3:  # volumes: the dense 3D model, not timm's
        from .volumes import build_volume_classifier
        return build_volume_classifier(cfg, num_classes, in_chans)
    import timm

    arch = f"convnextv2_{cfg.model.name}"
    kw = dict(num_classes=num_classes, in_chans=in_chans, drop_path_rate=cfg.drop_path_rate)
    if not cfg.weights:
        return timm.create_model(arch, pretrained=False, **kw)
    state, size, w_chans, fmt = load_timm_weights(cfg.weights)
    if size != cfg.model.name:
        raise ValueError(f"weights {cfg.weights} are convnextv2_{size}, but model={cfg.model.name}; pass model={size}")
    if w_chans != in_chans:
        raise ValueError(f"weights {cfg.weights} take {w_chans} input channels, the data has {in_chans}")
    # one rule for every format, as `sparse-fcmae convert`: the checkpoint's "model" (never "model_ema"),
    # renamed to timm keys. Not timm's pretrained loader: it prefers EMA weights and drops any head
    # that is not 1000-way, so a fine-tuned checkpoint would restart from its EMA without its head.
    model = timm.create_model(arch, pretrained=False, **kw)
    if "head.fc.weight" in state and state["head.fc.weight"].shape[0] != num_classes:
        del state["head.fc.weight"], state["head.fc.bias"]  # another task's head: train a fresh one
    from ..convert import load_timm_state

    load_timm_state(model, state)
    print(f"[{cfg.mode}] loaded {fmt} weights from {cfg.weights}")
    return model


def freeze_all_but_head(model: nn.Module) -> nn.Module:
    """linprobe: only the linear head trains; returns it."""
    for p in model.parameters():
        p.requires_grad_(False)
    head = model.get_classifier()
    for p in head.parameters():
        p.requires_grad_(True)
    return head


def build_optimizer(model: nn.Module, cfg: DictConfig, base_lr: float):
    """AdamW with timm's layer-wise lr decay (``lr_scale`` per group; ``optim.layer_decay=1`` turns it off)."""
    from timm.optim import create_optimizer_v2

    ld = cfg.optim.layer_decay
    return create_optimizer_v2(model, opt="adamw", lr=base_lr, weight_decay=cfg.optim.weight_decay,
                               layer_decay=ld if ld < 1.0 else None, betas=tuple(cfg.optim.betas),
                               **fused(next(model.parameters()).device))


def build_ema(cfg: DictConfig, model: nn.Module):
    """timm's ``ModelEmaV3`` of the fine-tuned model, or None (off, and always for linprobe)."""
    if not (cfg.ema.enabled and cfg.mode == "finetune"):
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=cfg.ema.decay)


def build_mixup(cfg: DictConfig, num_classes: int):
    """timm's Mixup/CutMix (soft targets, ``optim.label_smoothing`` folded in) and its loss; ``(None, None)`` when off.
    Its draws come from numpy's global RNG, which the checkpoint keeps (``rng``)."""
    a = cfg.aug
    if cfg.mode != "finetune" or not (a.mixup or a.cutmix):
        return None, None
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    mix = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, label_smoothing=cfg.optim.label_smoothing,
                num_classes=num_classes)
    return mix, SoftTargetCrossEntropy()
