"""The fine-tuning checkpoint: pretraining's training state (``training.state``: model, optimizer, position,
RNG states, written atomically) plus what fine-tuning adds (EMA weights, per-epoch metrics, evaluation counts)."""
from __future__ import annotations

import pathlib

import torch
from omegaconf import DictConfig, OmegaConf

from ..data import loader_workers
from ..distributed import DistEnv
from ..training.runtime import rng_state
from ..training.state import (
    Progress,
    check_compatible,
    find_resume_checkpoint,
    restore_training_state,
    save_training_state,
    training_state,
)
from .volumes import arch_name

# what a run folder's checkpoint must share with the run resuming it
FINETUNE_KEYS = ("model.name", "data.name", "data.in_chans", "data.img_size")


def geometry(cfg: DictConfig) -> dict:
    """What fixes the step boundaries: another batch size restarts an interrupted epoch (as pretraining); so does
    another number of shard streams (loader workers) when fine-tuning on shards."""
    geo = {"world_size": 1, "batch_size": cfg.data.batch_size, "accum_steps": 1}
    if cfg.data.name == "webdataset" and cfg.mode == "finetune":
        geo["loader_streams"] = max(1, loader_workers(cfg.data.num_workers))
    return geo


def save(path: pathlib.Path, cfg: DictConfig, model, optimizer, prog: Progress, steps_per_epoch: int,
         epoch_done: bool, *, ema, history: list, val_skipped: int, val_scored: int | None = None) -> None:
    """``checkpoint-last.pth``, atomically: ``model`` (the whole classifier, what ``convert`` and ``weights=`` read),
    ``model_ema``, ``optimizer``, the position, every RNG state (numpy's carries Mixup's draws), ``history``."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise FloatingPointError("parameters became non-finite: not overwriting the last good checkpoint")
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # fine-tuning runs in fp32: an empty scaler state
    state = training_state(model, optimizer, scaler, prog, None, [rng_state(next(model.parameters()).device)],
                           geometry(cfg), cfg, steps_per_epoch, 1, epoch_done)
    state.update(history=list(history), arch=arch_name(cfg), val_skipped=val_skipped,
                 val_scored=val_scored)  # held-out images scored by the last evaluation
    if ema is not None:
        state["model_ema"] = ema.module.state_dict()
    save_training_state(path, state, None, keep_last=1)


def find(cfg: DictConfig, run_dir: pathlib.Path) -> tuple[dict | None, pathlib.Path | None]:
    """The checkpoint to resume from (``resume=auto``: the run folder's), checked before anything is written."""
    ckpt, path = find_resume_checkpoint(cfg, run_dir)
    if ckpt is None:
        return None, None
    mode = OmegaConf.select(OmegaConf.create(ckpt.get("config") or {}), "mode")
    if mode != cfg.mode:
        raise ValueError(f"{path} is not a {cfg.mode} checkpoint (it was written by {mode or 'pretrain'}): "
                         "use another run_dir or resume=never")
    if "progress" not in ckpt or "optimizer" not in ckpt:
        raise ValueError(f"{path} holds no training position (written before finetune could resume): "
                         "use another run_dir or resume=never")
    check_compatible(ckpt, cfg, path, keys=FINETUNE_KEYS)
    return ckpt, path


def restore(ckpt: dict, cfg: DictConfig, model, optimizer, ema, device) -> tuple[Progress, list, int, bool]:
    """Load a :func:`save`d state into the run: ``(progress, history, val_skipped, restarted)``."""
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    prog, restarted = restore_training_state(ckpt, model, optimizer, scaler, None, DistEnv(), device, geometry(cfg))
    if ema is not None:
        ema.module.load_state_dict(ckpt["model_ema"] if "model_ema" in ckpt else model.state_dict())
    history = list(ckpt.get("history", []))[: prog.epoch]
    return prog, history, int(ckpt.get("val_skipped", 0)), restarted
