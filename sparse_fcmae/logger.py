"""Experiment loggers: ``none`` and ``wandb`` (offline / online / disabled; ``WANDB_MODE`` wins)."""
from __future__ import annotations

import netrc
import os
import pathlib
import secrets
from typing import Any
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

WANDB_MODES = ("offline", "online", "disabled")


class NullLogger:
    """Logs nothing (``logger=none``, and every DDP rank but 0)."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_image(self, key: str, path: pathlib.Path, step: int, caption: str = "") -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def wandb_mode(cfg: DictConfig) -> str:
    mode = os.environ.get("WANDB_MODE") or cfg.logger.mode
    if mode == "dryrun":  # wandb's old name for offline
        mode = "offline"
    if mode not in WANDB_MODES:
        raise ValueError(f"logger.mode (or WANDB_MODE) must be one of {', '.join(WANDB_MODES)}, got {mode!r}")
    return mode


def has_wandb_credentials() -> bool:
    """An API key from the places wandb reads without asking: WANDB_API_KEY, an identity token file,
    or a netrc entry for the W&B host (``wandb login`` writes one)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check_logger(cfg: DictConfig, is_main: bool) -> None:
    """Fail before the run folder is written: ``logger.mode=online`` without credentials would stop
    (or prompt) inside ``wandb.init``, after the run folder exists."""
    if not is_main or cfg.logger.name != "wandb":
        return
    if wandb_mode(cfg) == "online" and not has_wandb_credentials():
        raise ValueError("logger.mode=online needs W&B credentials (wandb login, or WANDB_API_KEY): none found; "
                         "use logger.mode=offline and `wandb sync` later")


class WandbLogger(NullLogger):
    """Weights & Biases run stored under ``<run_dir>/wandb``; a resumed run continues the same wandb run."""

    def __init__(self, cfg: DictConfig, run_dir: pathlib.Path):
        import wandb

        mode = wandb_mode(cfg)
        os.environ["WANDB_MODE"] = mode  # wandb reads it too: keep both in agreement (an empty one is invalid)
        id_file = run_dir / "wandb-run-id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        if not id_file.is_file() and mode != "disabled":
            id_file.write_text(run_id + "\n")
        self.wandb = wandb
        self.run = wandb.init(
            project=cfg.logger.project,
            entity=cfg.logger.get("entity"),
            name=cfg.logger.get("name") or run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=mode,
            config=OmegaConf.to_container(cfg, resolve=True),
        )
        self.mode = mode

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_image(self, key: str, path: pathlib.Path, step: int, caption: str = "") -> None:
        self.run.log({key: self.wandb.Image(str(path), caption=caption)}, step=step)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)
        # Wait until wandb's service process has written everything out and exited: its own atexit
        # hook is unreliable with DataLoader worker processes, and an offline run file read right
        # after we exit was once found holding only its header.
        self.wandb.teardown(exit_code=exit_code)


def build_logger(cfg: DictConfig, run_dir: pathlib.Path, is_main: bool) -> NullLogger:
    name = cfg.logger.name
    if name not in ("none", "wandb"):
        raise ValueError(f"logger must be none or wandb, got {name!r}")
    if not is_main or name == "none":
        return NullLogger()
    return WandbLogger(cfg, run_dir)
