"""The run folder's checkpoints: the training state written and found in one place (resume, compatibility)."""
from __future__ import annotations

import dataclasses
import io
import pathlib
import re
import sys

import torch
from omegaconf import DictConfig, OmegaConf

from ..checkpoint import CheckpointError, atomic_write, load_checkpoint
from .runtime import set_rng_state


# ---- checkpoints: checkpoint-last.pth (newest, may be mid-epoch) + the last K checkpoint-<epoch>.pth ----
@dataclasses.dataclass
class Progress:
    """Where training stands: epoch, micro-batches done in it, and the running epoch loss."""

    epoch: int = 0
    micro: int = 0  # micro-batches of `epoch` already trained (this rank's; accumulation boundaries only)
    loss_sum: float = 0.0
    loss_count: int = 0
    losses: list = dataclasses.field(default_factory=list)  # mean loss of each finished epoch
    skipped: int = 0  # unreadable files skipped so far (all ranks)


def numbered_checkpoints(run_dir: pathlib.Path) -> list[pathlib.Path]:
    """``checkpoint-<epoch>.pth`` files, newest first."""
    found = [(int(m.group(1)), p) for p in run_dir.glob("checkpoint-*.pth") if (m := re.fullmatch(r"checkpoint-(\d+)\.pth", p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def find_resume_checkpoint(cfg: DictConfig, run_dir: pathlib.Path) -> tuple[dict | None, pathlib.Path | None]:
    """``resume=auto``: the newest readable checkpoint in the run folder (checkpoint-last.pth, else the
    numbered ones, newest first); ``resume=never``: none; otherwise the given path, except that once the
    run folder holds its own checkpoint (a restart of a run that began from another folder's checkpoint),
    the run folder's newest one wins: it continues that path's training."""
    resume = str(cfg.resume)
    if resume in ("never", "false", "False", "none"):
        return None, None
    if resume != "auto":
        path = pathlib.Path(resume)
        if not path.is_file():
            raise CheckpointError(f"resume={resume}: checkpoint not found")
        if path.resolve().parent != run_dir.resolve():  # a path inside run_dir is an explicit roll-back
            ckpt, own = newest_checkpoint(run_dir)
            if ckpt is not None:
                return ckpt, own
        return load_checkpoint(path), path
    return newest_checkpoint(run_dir)


def newest_checkpoint(run_dir: pathlib.Path) -> tuple[dict | None, pathlib.Path | None]:
    for path in [run_dir / "checkpoint-last.pth", *numbered_checkpoints(run_dir)]:
        if path.is_file():
            try:
                return load_checkpoint(path), path
            except CheckpointError as e:  # e.g. a disk-full truncation: fall back to an older one
                print(f"warning: {e}; trying an older checkpoint", file=sys.stderr)
    return None, None


PRETRAIN_KEYS = ("model.name", "model.encoder", "model.decoder_dim", "model.decoder_depth", "model.kernel_size",
                 "model.spatial_dims", "data.in_chans")


def check_compatible(ckpt: dict, cfg: DictConfig, path: pathlib.Path, keys: tuple = PRETRAIN_KEYS) -> None:
    """A run folder's checkpoint must belong to the same model and input layout (``keys``: what must match)."""
    old = ckpt.get("config") or {}
    for key in keys:
        a = OmegaConf.select(OmegaConf.create(old), key) if old else None
        b = OmegaConf.select(cfg, key)
        if a is not None and a != b:
            raise ValueError(f"{path} was trained with {key}={a}, this run asks for {b}: use another run_dir or resume=never")


def save_training_state(path_last: pathlib.Path, state: dict, numbered: pathlib.Path | None, keep_last: int) -> None:
    """Serialise once, write ``checkpoint-last.pth`` (and ``checkpoint-<epoch>.pth``) atomically, prune old ones."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    try:  # atomic: a full disk leaves the previous files as they were (and no temp file)
        if numbered is not None:
            atomic_write(numbered, lambda f: f.write(data))
        atomic_write(path_last, lambda f: f.write(data))
    except OSError as e:
        raise OSError(f"cannot write a checkpoint in {path_last.parent} ({e.strerror or e}): "
                      f"{path_last.name} keeps the last good state") from None
    for old in numbered_checkpoints(path_last.parent)[keep_last:]:
        old.unlink(missing_ok=True)


def training_state(net, optimizer, scaler, prog: Progress, mask_gen: torch.Generator | None, rng: list,
                   geometry: dict, cfg: DictConfig, steps_per_epoch: int, accum: int, epoch_done: bool) -> dict:
    """The checkpoint: everything a resumed run needs to continue bit-identically (read back by
    :func:`restore_training_state`; ``model`` is also what ``sparse-fcmae convert`` reads). Fine-tuning has
    no masks: ``mask_gen=None``."""
    return {
        "model": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),  # fp16's loss scale ({} when unused)
        "epoch": prog.epoch - 1 if epoch_done else prog.epoch,  # last finished epoch when epoch_done
        "losses": list(prog.losses),
        "progress": dataclasses.asdict(prog),
        "global_step": prog.epoch * steps_per_epoch + prog.micro // accum,
        "mask_generator": mask_gen.get_state() if mask_gen is not None else None,
        "rng": rng,  # every rank's, so each resumes its own streams
        "geometry": geometry,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def restore_training_state(ckpt: dict, model, optimizer, scaler, mask_gen: torch.Generator | None, denv, device,
                           geometry: dict) -> tuple[Progress, bool]:
    """Load a :func:`training_state` into the run; ``(progress, restarted)``: a run with another geometry
    (processes, batch, accumulation) restarts the interrupted epoch from its beginning. ``denv``: the
    process's rank and world size (``DistEnv``; its default for one process)."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    prog = Progress(**ckpt["progress"]) if "progress" in ckpt else Progress(epoch=ckpt["epoch"] + 1, losses=list(ckpt.get("losses", [])))
    restarted = ckpt.get("geometry", geometry) != geometry and prog.micro > 0
    if restarted:
        prog.micro, prog.loss_sum, prog.loss_count = 0, 0.0, 0
    if mask_gen is not None and ckpt.get("mask_generator") is not None:
        mask_gen.set_state(ckpt["mask_generator"])
    states = ckpt.get("rng") or []
    if states:
        set_rng_state(states[denv.rank] if len(states) == denv.world_size else states[0], device)
    return prog, restarted


def lock_run_dir(run_dir: pathlib.Path, command: str = "pretrain"):
    """An exclusive lock on ``run_dir/.lock`` for the run's lifetime (keep the returned file open): a second run
    (``pretrain``, ``finetune``, ``linprobe``) on the same folder stops with one line. The kernel drops the lock
    when the process dies (``kill -9`` included), so a crashed run never leaves it stuck. A POSIX record lock
    (``lockf``), not ``flock``: an ``flock`` is shared with forked DataLoader workers, which outlive a killed run
    by seconds and kept its folder locked; a record lock belongs to the process alone."""
    import fcntl
    import os

    f = open(run_dir / ".lock", "a+")
    try:
        fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):  # EAGAIN or EACCES, as the platform reports a held lock
        f.seek(0)
        holder, _, pid = f.read().strip().rpartition("pid ")  # "<command> pid <n>", as written below
        f.close()
        raise ValueError(f"run_dir {run_dir} is in use by another {holder.strip() or 'run'}{f' (pid {pid})' if pid else ''}: "
                         "wait for it to finish or use another run_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"{command} pid {os.getpid()}\n")
    f.flush()
    return f

