"""Fine-tuning and linear probing of timm ConvNeXt V2 from converted (or on-the-fly converted) weights.

``finetune``: AdamW with layer-wise lr decay, label smoothing, optional EMA, warm-up + cosine schedule.
``linprobe``: the encoder (and the parameter-free final LayerNorm) frozen; only the linear head trains, on
pooled features computed once (the encoder is deterministic in eval mode, so caching them is exact).
"""
from __future__ import annotations

import json
import math
import pathlib
import time

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .checkpoint import atomic_write, save_checkpoint
from .optim import adamw, fused
from .training.runtime import plural, resolve_device, seed_everything
from .training.schedule import lr_at


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
def load_timm_weights(path: str) -> tuple[dict[str, torch.Tensor], str, int, str]:
    """Any checkpoint ``sparse-fcmae convert`` reads -> ``(timm state, size, in_chans, source format)``."""
    from .convert import load_weights

    state, info = load_weights(path, "timm")
    return state, info["size"], info["in_chans"], info["format"]


def build_classifier(cfg: DictConfig, num_classes: int, in_chans: int) -> nn.Module:
    """timm ``convnextv2_<size>``; from ``cfg.weights`` when given (its size must match ``cfg.model.name``)."""
    if cfg.model.get("spatial_dims", 2) == 3:  # volumes: the dense 3D model, not timm's
        from .finetune_volumes import build_volume_classifier
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
    from .convert import load_timm_state

    load_timm_state(model, state)
    print(f"[{cfg.mode}] loaded {fmt} weights from {cfg.weights}")
    return model


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def build_splits(cfg: DictConfig):
    """``(train, test, num_classes, in_chans)``: the digits' seeded held-out split, or two image folders."""
    from .data import build_dataset

    d = cfg.data
    if d.name == "webdataset":  # shards are streams without the class list and held-out split this needs
        raise ValueError(f"{cfg.mode} reads image folders or the digits; data=webdataset is for pretraining only")
    if d.name in ("imagefolder", "volumes") and not d.get("val_root"):
        raise ValueError(f"data={d.name} needs data.root=<train folder> and data.val_root=<validation folder>")
    # the same switch as pretraining; no flips for the digits (a mirrored digit is another glyph)
    kw = dict(name=d.name, img_size=d.img_size, in_chans=d.in_chans, seed=cfg.split_seed, flip=False,
              crop_scale=tuple(d.get("crop_scale") or (0.2, 1.0)), npy_layout=d.get("npy_layout") or "auto")
    if d.name == "volumes":  # conf/data/volumes.yaml: intensities, and flips in training only
        kw.update(volume={k: d[k] for k in ("clip", "clip_percentiles", "normalize")}, flip=d.flip)
    a = cfg.aug
    augment = {"rand_augment": a.rand_augment, "reprob": a.reprob} if cfg.mode == "finetune" else {}
    train = build_dataset(root=d.root, train=True, split="train", augment=augment, **kw)
    test = build_dataset(root=d.get("val_root"), train=False, split="test", augment={"crop_pct": a.crop_pct}, **kw)
    if train.num_classes < 2:
        raise ValueError(f"{cfg.mode} needs labelled data with at least 2 classes; data={d.name} has {train.num_classes}")
    if getattr(train, "classes", None) != getattr(test, "classes", None):
        raise ValueError("data.root and data.val_root have different class folders")
    n_cls, in_chans = train.num_classes, d.in_chans
    if d.get("max_images"):
        g = torch.Generator().manual_seed(cfg.seed)  # a random subset keeps every class
        train = torch.utils.data.Subset(train, torch.randperm(len(train), generator=g)[: d.max_images].tolist())
    if d.get("max_test_images"):
        test = torch.utils.data.Subset(test, range(min(d.max_test_images, len(test))))
    return train, test, n_cls, in_chans


def _unpack(batch, counter: list | None = None):
    """``(x, y)`` of a batch; an image folder's third item (1 = the file was unreadable) is added to ``counter[0]``."""
    if len(batch) > 2 and counter is not None:
        counter[0] += int(batch[2].sum())
    return batch[0], batch[1]


# ---------------------------------------------------------------------------------------------
# Loops
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, loader, device, skipped: list | None = None) -> float:
    """Top-1 accuracy (%)."""
    model.eval()
    correct = total = 0
    for batch in loader:
        x, y = _unpack(batch, skipped)
        correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
        total += y.numel()
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


def _set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)  # layer-wise decay scales each group


def build_optimizer(model: nn.Module, cfg: DictConfig, base_lr: float):
    from timm.optim import create_optimizer_v2

    ld = cfg.optim.layer_decay
    return create_optimizer_v2(model, opt="adamw", lr=base_lr, weight_decay=cfg.optim.weight_decay,
                               layer_decay=ld if ld < 1.0 else None, betas=tuple(cfg.optim.betas),
                               **fused(next(model.parameters()).device))


@torch.no_grad()
def _pooled_features(model: nn.Module, loader, device, skipped: list) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    feats, labels = [], []
    for batch in loader:
        x, y = _unpack(batch, skipped)
        feats.append(model.forward_head(model.forward_features(x.to(device)), pre_logits=True).cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def _run_dir(cfg: DictConfig) -> pathlib.Path:
    run_dir = pathlib.Path(cfg.run_dir) if cfg.run_dir else pathlib.Path(cfg.out_dir) / time.strftime(f"{cfg.mode}-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    text = OmegaConf.to_yaml(cfg, resolve=True)
    atomic_write(run_dir / "config.yaml", lambda f: f.write(text.encode()))
    return run_dir


def validate(cfg: DictConfig) -> None:
    """Reject bad values before anything is loaded or written, with a message naming the key."""
    o, d = cfg.optim, cfg.data
    if cfg.mode not in ("finetune", "linprobe"):
        raise ValueError(f"mode must be finetune or linprobe, got {cfg.mode!r}")
    from .finetune_volumes import validate_dims

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


def _validate_aug(cfg: DictConfig) -> None:
    a = cfg.aug
    if a.rand_augment is not None and not (isinstance(a.rand_augment, str) and a.rand_augment.startswith("rand")):
        raise ValueError(f"aug.rand_augment must be a timm RandAugment policy such as rand-m9-mstd0.5-inc1, or null; "
                         f"got {a.rand_augment!r}")
    if not 0.0 <= a.reprob <= 1.0 or a.mixup < 0 or a.cutmix < 0 or not 0.0 < a.crop_pct <= 1.0:
        raise ValueError("aug.reprob must be in [0, 1], aug.mixup and aug.cutmix >= 0, aug.crop_pct in (0, 1]")
    if cfg.mode == "linprobe" and (a.rand_augment or a.reprob or a.mixup or a.cutmix):
        raise ValueError("linprobe trains on features computed once: aug.rand_augment/reprob/mixup/cutmix must be off")
    if (a.rand_augment or a.reprob) and cfg.data.name != "imagefolder":
        raise ValueError(f"aug.rand_augment and aug.reprob work on image folders (data=imagefolder), not data={cfg.data.name}")
    if (a.mixup or a.cutmix) and cfg.data.batch_size % 2:
        raise ValueError(f"aug.mixup/cutmix pair each image with another: data.batch_size must be even, got {cfg.data.batch_size}")


def build_mixup(cfg: DictConfig, num_classes: int):
    """timm's Mixup/CutMix (soft targets, ``optim.label_smoothing`` folded in) and its loss; ``(None, None)`` when off."""
    a = cfg.aug
    if cfg.mode != "finetune" or not (a.mixup or a.cutmix):
        return None, None
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    mix = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, label_smoothing=cfg.optim.label_smoothing,
                num_classes=num_classes)
    return mix, SoftTargetCrossEntropy()


def finetune(cfg: DictConfig) -> dict:
    """Fine-tune (``cfg.mode=finetune``) or linear-probe (``linprobe``); returns top-1 and per-epoch losses."""
    validate(cfg)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    train_set, test_set, n_cls, in_chans = build_splits(cfg)
    model = build_classifier(cfg, n_cls, in_chans).to(device)
    bs = cfg.data.batch_size
    g = torch.Generator().manual_seed(cfg.seed)
    from .data import loader_workers

    nw = loader_workers(cfg.data.num_workers)
    mixup, mixup_loss = build_mixup(cfg, n_cls)
    if mixup is not None and len(train_set) < bs:
        raise ValueError(f"aug.mixup/cutmix need a full batch: {len(train_set)} training images < data.batch_size={bs}")
    run_dir = _run_dir(cfg)  # after every refusal: a refused run leaves no folder behind
    # an odd last batch cannot be mixed (timm pairs images): full batches only, as the official recipe
    drop_last = len(train_set) > bs or mixup is not None
    train_loader = DataLoader(train_set, batch_size=bs, shuffle=True, drop_last=drop_last, num_workers=nw, generator=g)
    test_loader = DataLoader(test_set, batch_size=bs, shuffle=False, num_workers=nw)
    base_lr = cfg.optim.lr or cfg.optim.blr * bs / 256
    criterion = mixup_loss or nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    from .finetune_volumes import arch_name

    arch, what = arch_name(cfg), "images" if cfg.model.get("spatial_dims", 2) == 2 else "volumes"
    print(f"[{cfg.mode}] {arch} on {cfg.data.name} ({len(train_set)} train / {len(test_set)} test {what}, "
          f"{cfg.data.img_size}{'px' if what == 'images' else '^3'}, {n_cls} classes), lr {base_lr:.2e}, "
          f"{plural(cfg.optim.epochs, 'epoch')}, run folder {run_dir}")

    skipped = {"train": [0], "val": [0]}  # unreadable image-folder files read (each counted once per pass)
    if cfg.mode == "linprobe":
        for p in model.parameters():
            p.requires_grad_(False)
        head = model.get_classifier()
        for p in head.parameters():
            p.requires_grad_(True)
        # frozen encoder: pool once, then train the linear head on the cached features
        x_tr, y_tr = _pooled_features(model, DataLoader(train_set, batch_size=bs, num_workers=nw), device, skipped["train"])
        x_te, y_te = _pooled_features(model, test_loader, device, skipped["val"])
        train_loader = DataLoader(TensorDataset(x_tr, y_tr), batch_size=bs, shuffle=True, generator=g)
        test_loader = DataLoader(TensorDataset(x_te, y_te), batch_size=bs)
        net, params = head, list(head.parameters())
        optimizer = adamw(params, device, lr=base_lr, weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas))
    else:
        net = model
        optimizer = build_optimizer(model, cfg, base_lr)

    ema = None
    if cfg.ema.enabled and cfg.mode == "finetune":
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.ema.decay)

    steps_per_epoch = len(train_loader)
    total, warmup = cfg.optim.epochs * steps_per_epoch, cfg.optim.warmup_epochs * steps_per_epoch
    history: list[dict] = []
    step = 0
    for epoch in range(cfg.optim.epochs):
        losses = []
        for batch in train_loader:
            x, y = _unpack(batch, skipped["train"])
            x, y = x.to(device), y.to(device)
            if mixup is not None:
                x, y = mixup(x, y)  # mixed images, soft targets
            _set_lr(optimizer, lr_at(step, base_lr, cfg.optim.min_lr, warmup, total))
            losses.append(train_step(net, x, y, optimizer, criterion, cfg.optim.clip_grad))
            if ema is not None:
                ema.update(model, step=step)
            step += 1
        rec = {"epoch": epoch + 1, "train_loss": sum(losses) / len(losses), "top1": evaluate(net, test_loader, device, skipped["val"])}
        if ema is not None:
            rec["top1_ema"] = evaluate(ema.module, test_loader, device)
        history.append(rec)
        extra = f", EMA top-1 {rec['top1_ema']:.2f}%" if ema is not None else ""
        print(f"[{cfg.mode}] epoch {epoch + 1}/{cfg.optim.epochs}: train loss {rec['train_loss']:.4f}, top-1 {rec['top1']:.2f}%{extra}")
        state = {"model": model.state_dict(), "epoch": epoch, "history": history,
                 "config": OmegaConf.to_container(cfg, resolve=True), "arch": arch}
        if ema is not None:
            state["model_ema"] = ema.module.state_dict()
        save_checkpoint(state, run_dir / "checkpoint-last.pth")
    result = {"mode": cfg.mode, "arch": arch, "weights": cfg.weights,
              "top1": history[-1]["top1"], "history": history, "run_dir": str(run_dir),
              "checkpoint": str(run_dir / "checkpoint-last.pth"),
              "skipped_files": {k: v[0] for k, v in skipped.items()}}
    if ema is not None:
        result["top1_ema"] = history[-1]["top1_ema"]
    text = json.dumps(result, indent=2)
    atomic_write(run_dir / "results.json", lambda f: f.write(text.encode()))
    n_skip = sum(result["skipped_files"].values())
    skip = f"; {n_skip} unreadable file read(s) skipped (train {skipped['train'][0]}, val {skipped['val'][0]})" if n_skip else ""
    print(f"[{cfg.mode}] top-1 {result['top1']:.2f}% ({len(test_set)} held-out {what}){skip}; results: {run_dir / 'results.json'}")
    return result
