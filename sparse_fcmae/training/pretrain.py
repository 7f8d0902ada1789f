"""FCMAE pretraining: config checks, the model, the run folder, then the loop (engine) with checkpoints (state)."""
from __future__ import annotations

import math
import pathlib
import sys
import time
import warnings

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from .. import distributed as du
from ..checkpoint import atomic_write
from ..config import with_defaults
from ..data.volumes import VOLUME_DATASETS
from ..logger import build_logger, check_logger
from ..masking import num_kept
from ..models import FCMAE
from ..models.base import KERNEL_SIZES
from ..optim import adamw
from ..preemption import Preempted, StopRequest, stopped
from ..visualize import reconstruction_panel, save_png
from .engine import AMP_DTYPES, train_one_epoch
from .loader import build_train_data
from .runtime import plural, resolve_device, rng_state, seed_everything
from .schedule import param_groups
from .state import (
    Progress,
    check_compatible,
    find_resume_checkpoint,
    lock_run_dir,
    restore_training_state,
    save_training_state,
    training_state,
)

# keys whose type is checked first, so that e.g. ``seed=abc`` is reported by name, not as a TypeError
INT_KEYS = ("seed", "data.img_size", "data.batch_size", "data.in_chans", "optim.epochs", "log_every", "panels",
            "panel_every")


NUMBER_KEYS = ("mask_ratio",)


def spatial_dims(cfg: DictConfig) -> int:
    """2 (images) or 3 (volumes): ``model.spatial_dims``, checked."""
    dims = cfg.model.spatial_dims
    if dims not in (2, 3):
        raise ValueError(f"model.spatial_dims must be 2 (images) or 3 (volumes), got {dims!r}")
    return dims


def check_types(cfg: DictConfig) -> None:
    for key in INT_KEYS + NUMBER_KEYS + ("data.max_images",):
        value = OmegaConf.select(cfg, key, default=None)
        if value is None and key not in ("seed", "mask_ratio", "data.img_size"):
            continue  # optional, or absent from an older config
        kinds = (int, float) if key in NUMBER_KEYS else int
        if isinstance(value, bool) or not isinstance(value, kinds):
            what = "a number" if key in NUMBER_KEYS else "an integer"
            raise ValueError(f"{key} must be {what}, got {value!r}")


def validate_config(cfg: DictConfig) -> None:
    """Reject bad values before anything starts, with a message naming the key."""
    check_types(cfg)
    if not 0.0 < cfg.mask_ratio < 1.0:
        # the loss covers masked patches only: at 0 it is exactly 0 and nothing trains
        raise ValueError(f"mask_ratio must be in (0, 1) (0 masks nothing, so the loss is 0), got {cfg.mask_ratio}")
    if cfg.data.img_size < 32 or cfg.data.img_size % 32:
        raise ValueError(f"data.img_size must be divisible by 32, got {cfg.data.img_size}")
    dims = spatial_dims(cfg)
    if (cfg.data.name in VOLUME_DATASETS) != (dims == 3):
        raise ValueError(f"data={cfg.data.name} gives {'volumes' if dims == 2 else 'images'}, model.spatial_dims={dims} "
                         f"expects {'images' if dims == 2 else 'volumes'}: use model.spatial_dims=3 with data="
                         f"{' or '.join(VOLUME_DATASETS)}")
    if cfg.model.kernel_size not in KERNEL_SIZES:
        raise ValueError(f"model.kernel_size must be one of {KERNEL_SIZES}, got {cfg.model.kernel_size!r}")
    if dims == 3 and cfg.init:
        raise ValueError("init= loads image weights; volumes start from random weights (model.spatial_dims=3)")
    patches = (cfg.data.img_size // 32) ** dims
    if num_kept(patches, cfg.mask_ratio) < 1:  # the encoder would see no patch at all
        raise ValueError(f"mask_ratio={cfg.mask_ratio} keeps no patch at data.img_size={cfg.data.img_size} "
                         f"(int({patches} x (1 - {cfg.mask_ratio})) = 0): lower mask_ratio or raise data.img_size")
    if cfg.data.get("max_images") is not None and cfg.data.max_images < 1:
        raise ValueError(f"data.max_images must be >= 1 or null (all images), got {cfg.data.max_images}")
    for key, low in (("log_every", 1), ("panel_every", 0), ("panels", 0)):
        if OmegaConf.select(cfg, key) < low:
            raise ValueError(f"{key} must be >= {low}, got {cfg[key]}")
    if cfg.data.batch_size < 1 or cfg.optim.epochs < 1:
        raise ValueError("data.batch_size and optim.epochs must be >= 1")
    if cfg.data.in_chans < 1:
        raise ValueError(f"data.in_chans must be >= 1, got {cfg.data.in_chans}")
    if cfg.optim.accum_steps < 1:
        raise ValueError(f"optim.accum_steps must be >= 1, got {cfg.optim.accum_steps}")
    if not 0 <= cfg.optim.warmup_epochs <= cfg.optim.epochs:
        raise ValueError(f"optim.warmup_epochs must be in [0, optim.epochs], got {cfg.optim.warmup_epochs}")
    lr = cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.blr
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"optim.lr / optim.blr must be positive, got {lr}")
    if cfg.optim.weight_decay < 0 or cfg.optim.min_lr < 0:
        raise ValueError("optim.weight_decay and optim.min_lr must be >= 0")
    if cfg.optim.clip_grad is not None and not cfg.optim.clip_grad > 0:
        raise ValueError(f"optim.clip_grad must be positive or null, got {cfg.optim.clip_grad}")
    if cfg.precision not in AMP_DTYPES:
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {cfg.precision}")
    for key in ("compile", "graph"):
        if not isinstance(cfg.get(key, False), bool):
            raise ValueError(f"{key} must be true or false, got {cfg.get(key)!r}")
    if cfg.get("graph", False) and cfg.model.encoder != "sparse":
        raise ValueError(f"graph=true is for the sparse encoder (model.encoder=sparse), got model.encoder={cfg.model.encoder}")
    if cfg.checkpoint.keep_last < 1 or cfg.checkpoint.every_steps < 0:
        raise ValueError("checkpoint.keep_last must be >= 1 and checkpoint.every_steps >= 0")
    if not (isinstance(cfg.dist_timeout_s, (int, float)) and cfg.dist_timeout_s > 0):
        raise ValueError(f"dist_timeout_s must be a positive number of seconds, got {cfg.dist_timeout_s!r}")
    if cfg.logger.name not in ("none", "wandb"):
        raise ValueError(f"logger must be none or wandb, got {cfg.logger.name!r}")


def build_model(cfg: DictConfig) -> FCMAE:
    """The FCMAE model a config describes (keys it lacks: conf/pretrain.yaml's)."""
    cfg = with_defaults(cfg, "pretrain")
    return FCMAE(
        size=cfg.model.name,
        in_chans=cfg.data.in_chans,
        mask_ratio=cfg.mask_ratio,
        decoder_depth=cfg.model.decoder_depth,
        decoder_dim=cfg.model.decoder_dim,
        norm_pix_loss=cfg.norm_pix_loss,
        drop_path_rate=cfg.model.drop_path_rate,
        encoder=cfg.model.encoder,
        kernel_size=cfg.model.kernel_size,
        spatial_dims=spatial_dims(cfg),
    )


def compile_model(model: FCMAE) -> None:
    """``torch.compile`` the model whole, in place (parameter names, hence checkpoints, unchanged); the sparse
    encoder first switches to its graph path (``use_graph``: no MinkowskiEngine object, static shapes at the
    fixed mask ratio), so the whole step traces into one graph."""
    if hasattr(model.encoder, "use_graph"):
        model.encoder.use_graph()
    model.compile()


def load_init_weights(model: FCMAE, path: str, size: str, in_chans: int) -> str:
    """Start pretraining from weights in any format ``sparse-fcmae convert`` reads (released dense
    ``*_fcmae.pt`` files, timm, official or our FCMAE checkpoints). The encoder must match exactly;
    an FCMAE checkpoint's decoder is taken too when its shapes fit. Returns a one-line summary."""
    from ..convert import load_weights

    enc, info = load_weights(path, "sparse")
    fmt, w_size, w_chans, state = info["format"], info["size"], info["in_chans"], info["source"]
    if (w_size, w_chans) != (size, in_chans):
        raise ValueError(f"init weights {path} are convnextv2_{w_size} with {w_chans} input channel(s); "
                         f"this run is {size} with {in_chans}")
    model.encoder.load_state_dict(enc, strict=True)
    own = model.state_dict()
    decoder = {k: v for k, v in state.items() if not k.startswith("encoder.") and k in own and own[k].shape == v.shape}
    model.load_state_dict(decoder, strict=False)
    return f"{fmt} weights from {path} (encoder{' + decoder' if decoder else ''})"


def plan_run_dir(cfg: DictConfig) -> pathlib.Path:
    """The run folder's path (not created yet: every check runs before anything is written)."""
    if cfg.run_dir:
        return pathlib.Path(cfg.run_dir)
    return pathlib.Path(cfg.out_dir) / time.strftime("pretrain-%Y%m%d-%H%M%S")


def make_run_dir(cfg: DictConfig, run_dir: pathlib.Path) -> pathlib.Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = OmegaConf.to_yaml(cfg, resolve=True)
    atomic_write(run_dir / "config.yaml", lambda f: f.write(text.encode()))
    return run_dir


@torch.no_grad()
def save_reconstructions(model: FCMAE, dataset, n: int, path: pathlib.Path, device: torch.device, seed: int) -> None:
    model.eval()
    imgs = torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))]).to(device)  # fixed samples
    mask = model.random_masking(imgs, torch.Generator(device=imgs.device).manual_seed(seed))
    _, pred, mask = model(imgs, mask)
    save_png(reconstruction_panel(imgs.cpu(), mask.cpu(), model.reconstruct(pred, imgs).cpu()), path)
    model.train()


def _unwrap(model: torch.nn.Module) -> FCMAE:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _stop_if_peer_lost(e: Exception, denv: du.DistEnv, run_dir: pathlib.Path) -> None:
    """A collective failed because another rank died or hung: say so in one line and exit 2. Printed here,
    while SIGTERM is still caught: torchrun's agent SIGTERMs the survivors as soon as one rank dies."""
    if denv.enabled and du.is_peer_failure(e):
        print(du.peer_failure_message(e, denv, run_dir), file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def pretrain(cfg: DictConfig) -> dict:
    """Run FCMAE pretraining (one process, or one DDP rank); returns a summary with the run folder and losses."""
    cfg = with_defaults(cfg, "pretrain")  # conf/pretrain.yaml: the one source of defaults
    validate_config(cfg)
    device = resolve_device(cfg.device)
    denv = du.init_distributed(device.type, str(cfg.dist_backend), cfg.dist_timeout_s)
    try:
        if denv.enabled and device.type == "cuda":
            device = torch.device("cuda", denv.local_rank)
        return _pretrain(cfg, device, denv)
    finally:
        du.cleanup()


def _pretrain(cfg: DictConfig, device: torch.device, denv: du.DistEnv) -> dict:
    main = denv.is_main
    say = print if main else (lambda *a, **k: None)
    seed_everything(cfg.seed)
    # data first: an empty or missing folder must fail before a run folder or checkpoint exists
    data = build_train_data(cfg, denv, device)
    loader, samples, steps_per_epoch = data.loader, data.samples, data.steps_per_epoch
    accum = cfg.optim.accum_steps
    batch = cfg.data.batch_size
    eff_batch = batch * accum * denv.world_size
    geometry = {"world_size": denv.world_size, "batch_size": batch, "accum_steps": accum, **data.geometry}

    model = build_model(cfg)  # same init on every rank (seeded); DDP broadcasts rank 0's anyway
    if cfg.init:  # a resumed run's checkpoint replaces these below
        say(f"[pretrain] starting from {load_init_weights(model, cfg.init, cfg.model.name, cfg.data.in_chans)}")
    model = model.to(device)
    if cfg.compile:
        compile_model(model)
        say("[pretrain] torch.compile: the model" + (" (sparse encoder: graph path)" if cfg.model.encoder == "sparse" else ""))
    elif cfg.get("graph", False):
        model.encoder.use_graph()
        say("[pretrain] sparse encoder: graph path")
    base_lr = cfg.optim.lr or cfg.optim.blr * eff_batch / 256
    optimizer = adamw(param_groups(model, cfg.optim.weight_decay), device, lr=base_lr, betas=tuple(cfg.optim.betas))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    mask_gen = torch.Generator().manual_seed(cfg.seed + 1_000_003)  # masks: their own stream, same on every rank
    seed_everything(cfg.seed + denv.rank)  # drop path etc.: independent per rank

    run_dir = du.broadcast_object(plan_run_dir(cfg) if main else None)
    prog = Progress()
    # everything that can refuse the run comes before the run folder is written (config.yaml included)
    # one run per run_dir: an existing folder is locked before anything is read from it; a new one once made
    lock = lock_run_dir(run_dir) if main and run_dir.is_dir() else None
    ckpt, ckpt_path = find_resume_checkpoint(cfg, run_dir)
    if ckpt is not None:
        check_compatible(ckpt, cfg, ckpt_path)
    check_logger(cfg, main)
    if main:
        make_run_dir(cfg, run_dir)
        lock = lock or lock_run_dir(run_dir)
    if ckpt is not None:
        prog, restarted = restore_training_state(ckpt, model, optimizer, scaler, mask_gen, denv, device, geometry)
        if restarted:
            say(f"warning: {ckpt_path} was written with {ckpt.get('geometry')}, this run uses {geometry}: "
                f"epoch {prog.epoch} restarts from its beginning", file=sys.stderr)
        say(f"[pretrain] resuming from {ckpt_path} (epoch {prog.epoch}, micro-batch {prog.micro})")
        if main:
            for tmp in run_dir.glob(".checkpoint-*.tmp"):  # left by a killed writer; never read
                tmp.unlink(missing_ok=True)
    if denv.enabled:
        # The decoder's depthwise weights (C, 1, 7, 7) get their gradients with channels_last strides (its input
        # is channels_last); with a size-1 dimension that is the same memory order as the weight's, but DDP
        # compares strides literally and warns on every rank. Nothing to fix, so nothing to print.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[denv.local_rank] if device.type == "cuda" else None)
    net = _unwrap(model)
    n_params = sum(p.numel() for p in net.parameters())
    say(f"[pretrain] {cfg.model.name} ({cfg.model.encoder} encoder, {n_params / 1e6:.2f}M params) on {cfg.data.name} "
        f"({plural(data.num_images, 'image' if spatial_dims(cfg) == 2 else 'volume')}, {cfg.data.img_size}"
        f"{'px' if spatial_dims(cfg) == 2 else '^3 voxels'}, {cfg.data.in_chans} ch), mask {cfg.mask_ratio}, "
        f"{plural(cfg.optim.epochs, 'epoch')} x {plural(steps_per_epoch, 'step')}, batch {batch} x accum {accum} x {denv.world_size} proc = "
        f"{eff_batch}, lr {base_lr:.3g}, {cfg.precision}, device {device}, run folder {run_dir}")

    logger = build_logger(cfg, run_dir, main)
    keep_last = cfg.checkpoint.keep_last
    every = cfg.checkpoint.every_steps
    panels = cfg.panels  # 0: no reconstruction panels at all (an empty panel cannot be drawn)
    panel_every = cfg.panel_every if panels else 0
    log_every = max(1, cfg.log_every)

    def checkpoint(epoch_done: bool) -> None:
        rng = du.all_gather_object(rng_state(device))  # every rank's, so each resumes its own streams
        if not main:
            return
        if not all(torch.isfinite(p).all() for p in net.parameters()):
            raise FloatingPointError("parameters became non-finite: not overwriting the last good checkpoint")
        state = training_state(net, optimizer, scaler, prog, mask_gen, rng, geometry, cfg, steps_per_epoch, accum,
                               epoch_done)
        numbered = run_dir / f"checkpoint-{prog.epoch - 1}.pth" if epoch_done else None
        save_training_state(run_dir / "checkpoint-last.pth", state, numbered, keep_last)

    def panel(name: str, step: int) -> pathlib.Path:
        path = run_dir / name
        save_reconstructions(net, samples, cfg.panels, path, device, cfg.seed)
        logger.log_image("reconstruction", path, step, caption="original | masked | reconstruction")
        return path

    def on_step(step: int, metrics: dict) -> None:
        if main and step % log_every == 0:
            logger.log(metrics, step)
        if every and step % every == 0 and prog.micro < steps_per_epoch * accum:
            checkpoint(epoch_done=False)

    total = cfg.optim.epochs * steps_per_epoch
    start_step = prog.epoch * steps_per_epoch + prog.micro // accum
    ok = False
    stop = StopRequest().__enter__()  # from here on SIGTERM/SIGUSR1 stop after a step, with a checkpoint
    try:
        with tqdm(total=total, initial=start_step, desc="pretrain", unit="step", dynamic_ncols=True, mininterval=1.0,
                  disable=not main) as bar:
            while prog.epoch < cfg.optim.epochs:
                epoch = prog.epoch
                data.set_epoch(epoch, prog.micro)
                mean = train_one_epoch(model, loader, optimizer, epoch, cfg, steps_per_epoch, base_lr, device, bar,
                                       prog=prog, mask_gen=mask_gen, denv=denv, on_step=on_step, scaler=scaler,
                                       stop=stop)
                prog.losses.append(mean)
                prog.epoch, prog.micro, prog.loss_sum, prog.loss_count = epoch + 1, 0, 0.0, 0
                if main:
                    bar.write(f"[pretrain] epoch {epoch + 1}/{cfg.optim.epochs}: mean loss {mean:.4f}")
                    logger.log({"epoch/loss": mean, "epoch/epoch": epoch + 1}, (epoch + 1) * steps_per_epoch)
                checkpoint(epoch_done=True)
                if main and panel_every and (epoch + 1) % panel_every == 0 and epoch + 1 < cfg.optim.epochs:
                    panel(f"reconstruction-e{epoch + 1:04d}.png", (epoch + 1) * steps_per_epoch)
        path = run_dir / "reconstruction.png" if panels else None
        if main:
            if panels:
                panel("reconstruction.png", total)
            if prog.losses:
                print(f"[pretrain] done: loss {prog.losses[0]:.4f} -> {prog.losses[-1]:.4f}"
                      + (f"; {prog.skipped} unreadable file read(s) skipped (counted once per file and epoch)" if prog.skipped else ""))
            print(f"[pretrain] checkpoint: {run_dir / 'checkpoint-last.pth'}")
            if panels:
                print(f"[pretrain] reconstructions (original | masked | reconstruction): {path}")
        ok = True
    except Preempted as p:
        try:
            checkpoint(epoch_done=False)  # the position inside the epoch: the same command resumes there
        except Exception as e:
            _stop_if_peer_lost(e, denv, run_dir)
            raise
        if main:
            step_now = prog.epoch * steps_per_epoch + prog.micro // accum
            print(stopped("pretrain", p.signum, step_now, run_dir / "checkpoint-last.pth", cfg.requeue),
                  file=sys.stderr, flush=True)
        raise SystemExit(128 + p.signum) from None
    except Exception as e:
        _stop_if_peer_lost(e, denv, run_dir)
        raise
    finally:
        stop.__exit__(None, None, None)
        logger.finish(exit_code=0 if ok else 1)
        if lock is not None:
            lock.close()  # releases the run_dir lock
    return {"run_dir": run_dir, "losses": prog.losses, "checkpoint": run_dir / "checkpoint-last.pth", "panel": path,
            "skipped": prog.skipped}
