"""finetune / linprobe config refusals: each names its key, before anything is loaded or written."""
from __future__ import annotations

import math

from omegaconf import DictConfig

from .volumes import validate_dims


def validate(cfg: DictConfig) -> None:
    """Reject bad values before anything is loaded or written, with a message naming the key."""
    o, d = cfg.optim, cfg.data
    if cfg.mode not in ("finetune", "linprobe"):
        raise ValueError(f"mode must be finetune or linprobe, got {cfg.mode!r}")
    validate_dims(cfg)  # images (timm's model) or volumes (the dense 3D one)
    if o.epochs < 1 or d.batch_size < 1:
        raise ValueError("optim.epochs and data.batch_size must be >= 1")
    if d.img_size < 32 or d.img_size % 32:
        raise ValueError(f"data.img_size must be divisible by 32, got {d.img_size}")
    if d.in_chans < 1:
        raise ValueError(f"data.in_chans must be >= 1, got {d.in_chans}")
    if not 0 <= o.warmup_epochs <= o.epochs:
        raise ValueError(f"optim.warmup_epochs must be in [0, optim.epochs={o.epochs}], got {o.warmup_epochs}")
    lr = o.lr if o.lr is not None else o.blr
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"optim.lr / optim.blr must be positive, got {lr}")
    if not (isinstance(o.layer_decay, (int, float)) and 0.0 < o.layer_decay <= 1.0):
        raise ValueError(f"optim.layer_decay must be in (0, 1] (1 = off), got {o.layer_decay}")
    if o.weight_decay < 0 or o.min_lr < 0:
        raise ValueError("optim.weight_decay and optim.min_lr must be >= 0")
    if o.clip_grad is not None and not o.clip_grad > 0:
        raise ValueError(f"optim.clip_grad must be positive or null, got {o.clip_grad}")
    if not 0.0 <= o.label_smoothing < 1.0:
        raise ValueError(f"optim.label_smoothing must be in [0, 1), got {o.label_smoothing}")
    if cfg.mode == "linprobe" and cfg.ema.enabled:  # the head trains on cached features: no EMA model exists
        raise ValueError("ema.enabled=true is not supported by linprobe (only the linear head trains); leave ema off")
    if cfg.ema.enabled and not 0.0 < cfg.ema.decay < 1.0:
        raise ValueError(f"ema.decay must be in (0, 1), got {cfg.ema.decay}")
    _validate_aug(cfg)
    if d.name == "webdataset":
        _validate_shards(cfg)


def _validate_aug(cfg: DictConfig) -> None:
    a = cfg.aug
    if a.rand_augment is not None and not (isinstance(a.rand_augment, str) and a.rand_augment.startswith("rand")):
        raise ValueError(f"aug.rand_augment must be a timm RandAugment policy such as rand-m9-mstd0.5-inc1, or null; "
                         f"got {a.rand_augment!r}")
    if not 0.0 <= a.reprob <= 1.0 or a.mixup < 0 or a.cutmix < 0 or not 0.0 < a.crop_pct <= 1.0:
        raise ValueError("aug.reprob must be in [0, 1], aug.mixup and aug.cutmix >= 0, aug.crop_pct in (0, 1]")
    if cfg.mode == "linprobe" and (a.rand_augment or a.reprob or a.mixup or a.cutmix):
        raise ValueError("linprobe trains on features computed once: aug.rand_augment/reprob/mixup/cutmix must be off")
    if (a.rand_augment or a.reprob) and cfg.data.name not in ("imagefolder", "webdataset"):
        raise ValueError(f"aug.rand_augment and aug.reprob work on image folders and shards (data=imagefolder or webdataset), "
                         f"not data={cfg.data.name}")
    if (a.mixup or a.cutmix) and cfg.data.batch_size % 2:
        raise ValueError(f"aug.mixup/cutmix pair each image with another: data.batch_size must be even, got {cfg.data.batch_size}")


def _validate_shards(cfg: DictConfig) -> None:
    """data=webdataset: a stream has no class list and no held-out split; both are named in the config."""
    d = cfg.data
    n = d.get("num_classes")
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"{cfg.mode} on data=webdataset needs data.num_classes=N (>= 2; the .cls labels are 0..N-1): "
                         f"a stream has no class list; got {n!r}")
    if not d.get("val_urls"):
        raise ValueError(f"{cfg.mode} on data=webdataset needs data.val_urls='/data/val-{{000000..000009}}.tar' "
                         "(quoted), the validation shards")
    if d.max_test_images:
        raise ValueError("data.max_test_images works on image folders and the digits; with shards, list fewer data.val_urls")
    if d.max_images and cfg.mode == "linprobe":
        raise ValueError("linprobe reads every sample of data.urls once (its features are cached): data.max_images "
                         "does not apply; list fewer shards")
