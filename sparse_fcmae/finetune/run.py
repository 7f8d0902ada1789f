"""``finetune``: config (conf/finetune.yaml or linprobe.yaml), data, model, run folder (locked, resumed), the epochs,
and a clean stop on SIGTERM/SIGUSR1 (checkpoint with the position, one line, exit 128 + signal)."""
from __future__ import annotations

import json
import pathlib
import sys
import time

from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import TensorDataset

from ..checkpoint import atomic_write
from ..config import with_defaults
from ..data import loader_workers
from ..optim import adamw
from ..preemption import Preempted, StopRequest, stopped
from ..training.runtime import plural, resolve_device, seed_everything
from ..training.state import Progress, lock_run_dir
from . import state as ft_state
from .checks import validate
from .data import ByIndex, build_splits, count, eval_loader, finetune_batches, loader, pooled_features, train_loader
from .loop import evaluate, train_epoch
from .model import build_classifier, build_ema, build_mixup, build_optimizer, freeze_all_but_head
from .volumes import arch_name


def plan_run_dir(cfg: DictConfig) -> pathlib.Path:
    """The run folder's path (not created yet: every refusal comes before anything is written)."""
    if cfg.run_dir:
        return pathlib.Path(cfg.run_dir)
    return pathlib.Path(cfg.out_dir) / time.strftime(f"{cfg.mode}-%Y%m%d-%H%M%S")


def finetune(cfg: DictConfig) -> dict:
    """Fine-tune (``cfg.mode=finetune``) or linear-probe (``linprobe``); returns top-1 and per-epoch metrics.
    Started again on the same ``run_dir`` it resumes from ``checkpoint-last.pth`` (``resume=auto``)."""
    cfg = with_defaults(cfg, cfg.mode if cfg.get("mode") in ("finetune", "linprobe") else "finetune")
    validate(cfg)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    train_set, test_set, n_cls, in_chans = build_splits(cfg)
    model = build_classifier(cfg, n_cls, in_chans).to(device)
    bs = cfg.data.batch_size
    nw = loader_workers(cfg.data.num_workers)
    mixup, mixup_loss = build_mixup(cfg, n_cls)
    if mixup is not None and count(train_set) < bs:
        raise ValueError(f"aug.mixup/cutmix need a full batch: {count(train_set)} training images < data.batch_size={bs}")
    # one run per run folder: an existing one is locked before anything is read from it, a new one once made
    run_dir = plan_run_dir(cfg)
    lock = lock_run_dir(run_dir, cfg.mode) if run_dir.is_dir() else None
    try:
        ckpt, ckpt_path = ft_state.find(cfg, run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)  # after every refusal: a refused run leaves no folder behind
        lock = lock or lock_run_dir(run_dir, cfg.mode)
        text = OmegaConf.to_yaml(cfg, resolve=True)
        atomic_write(run_dir / "config.yaml", lambda f: f.write(text.encode()))
        return _run(cfg, device, model, train_set, test_set, n_cls, nw, mixup, mixup_loss, run_dir, ckpt, ckpt_path)
    finally:
        if lock is not None:
            lock.close()  # releases the run_dir lock


def _run(cfg, device, model, train_set, test_set, n_cls, nw, mixup, mixup_loss, run_dir, ckpt, ckpt_path) -> dict:
    bs = cfg.data.batch_size
    # an odd last batch cannot be mixed (timm pairs images): full batches only, as the official recipe
    n_train, n_test = count(train_set), count(test_set)  # None: remote shards read once (not counted)
    drop_last = mixup is not None or n_train is None or n_train > bs
    test_loader = eval_loader(test_set, bs, nw)
    base_lr = cfg.optim.lr or cfg.optim.blr * bs / 256
    criterion = mixup_loss or nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    what, edge = ("images", "px") if cfg.model.spatial_dims == 2 else ("volumes", "^3")
    print(f"[{cfg.mode}] {arch_name(cfg)} on {cfg.data.name} ({n_train or '?'} train / {n_test or '?'} test {what}, "
          f"{cfg.data.img_size}{edge}, {n_cls} classes), lr {base_lr:.2e}, {plural(cfg.optim.epochs, 'epoch')}, "
          f"run folder {run_dir}")
    prog, history, val_skipped = Progress(), [], [0]  # unreadable files / samples (each counted once per pass)
    scored = [n_test]  # held-out images scored (shards: corrupt ones are not)
    stop = StopRequest().__enter__()  # from here on SIGTERM/SIGUSR1 stop between two steps, with a checkpoint
    try:
        if cfg.mode == "linprobe":
            head = freeze_all_but_head(model)
            # frozen encoder: pool once (the encoder is deterministic in eval mode), then train the head on that
            skipped = [0]
            x_tr, y_tr = pooled_features(model, train_set, cfg, nw, device, skipped)
            x_te, y_te = pooled_features(model, test_set, cfg, nw, device, val_skipped)
            train_batches = train_loader(ByIndex(TensorDataset(x_tr, y_tr)), cfg, 0, len(x_tr) > bs)
            steps_per_epoch = len(train_batches)

            def set_epoch(epoch, micro):
                train_batches.sampler.set_epoch(epoch, start=micro * bs)

            test_loader = loader(TensorDataset(x_te, y_te), bs, 0)
            net = head
            optimizer = adamw(list(head.parameters()), device, lr=base_lr, weight_decay=cfg.optim.weight_decay,
                              betas=tuple(cfg.optim.betas))
            prog.skipped = skipped[0]
        else:
            net = model
            train_batches, steps_per_epoch, set_epoch = finetune_batches(train_set, cfg, nw, drop_last)
            optimizer = build_optimizer(model, cfg, base_lr)
        ema = build_ema(cfg, model)
        if ckpt is not None:
            prog, history, val_skipped[0], restarted = ft_state.restore(ckpt, cfg, model, optimizer, ema, device)
            scored[0] = ckpt.get("val_scored") or scored[0]
            if restarted:
                print(f"warning: {ckpt_path} was written with {ckpt.get('geometry')}, this run uses "
                      f"{ft_state.geometry(cfg)}: epoch {prog.epoch} restarts from its beginning", file=sys.stderr)
            print(f"[{cfg.mode}] resuming from {ckpt_path} (epoch {prog.epoch}, step {prog.micro} of {steps_per_epoch})")
        last = run_dir / "checkpoint-last.pth"

        def save(epoch_done: bool) -> None:
            ft_state.save(last, cfg, model, optimizer, prog, steps_per_epoch, epoch_done, ema=ema, history=history,
                          val_skipped=val_skipped[0], val_scored=scored[0])

        while prog.epoch < cfg.optim.epochs:
            epoch = prog.epoch
            set_epoch(epoch, prog.micro)  # a resumed epoch skips what it trained on
            mean = train_epoch(net, train_batches, optimizer, criterion, cfg, prog, steps_per_epoch, base_lr, device,
                               mixup=mixup, ema=ema, model=model, stop=stop)
            rec = {"epoch": epoch + 1, "train_loss": mean, "top1": evaluate(net, test_loader, device, val_skipped, scored)}
            if ema is not None:
                rec["top1_ema"] = evaluate(ema.module, test_loader, device)
            history.append(rec)
            prog.losses.append(mean)
            prog.epoch, prog.micro, prog.loss_sum, prog.loss_count = epoch + 1, 0, 0.0, 0
            extra = f", EMA top-1 {rec['top1_ema']:.2f}%" if ema is not None else ""
            print(f"[{cfg.mode}] epoch {epoch + 1}/{cfg.optim.epochs}: train loss {mean:.4f}, top-1 {rec['top1']:.2f}%{extra}")
            save(epoch_done=True)
    except Preempted as p:
        save(epoch_done=False)  # the position inside the epoch: the same command resumes there
        print(stopped(cfg.mode, p.signum, prog.epoch * steps_per_epoch + prog.micro, last, cfg.requeue),
              file=sys.stderr, flush=True)
        raise SystemExit(128 + p.signum) from None
    finally:
        stop.__exit__(None, None, None)
    return _results(cfg, history, ema is not None, run_dir, {"train": prog.skipped, "val": val_skipped[0]}, scored[0])


def _results(cfg, history: list, with_ema: bool, run_dir: pathlib.Path, skipped: dict, n_test: int) -> dict:
    """``results.json`` (atomically) and the closing line."""
    result = {"mode": cfg.mode, "arch": arch_name(cfg), "weights": cfg.weights,
              "top1": history[-1]["top1"], "history": history, "run_dir": str(run_dir),
              "checkpoint": str(run_dir / "checkpoint-last.pth"), "skipped_files": skipped}
    if with_ema:
        result["top1_ema"] = history[-1]["top1_ema"]
    text = json.dumps(result, indent=2)
    atomic_write(run_dir / "results.json", lambda f: f.write(text.encode()))
    n_skip = sum(skipped.values())
    skip = f"; {n_skip} unreadable file read(s) skipped (train {skipped['train']}, val {skipped['val']})" if n_skip else ""
    what = "images" if cfg.model.spatial_dims == 2 else "volumes"
    print(f"[{cfg.mode}] top-1 {result['top1']:.2f}% ({n_test} held-out {what}){skip}; results: {run_dir / 'results.json'}")
    return result
