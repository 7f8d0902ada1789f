"""Checkpoints: atomic writes, and loading without unpickling arbitrary code."""
from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read safely (missing, truncated, foreign, or unsafe)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write_fn) -> pathlib.Path:
    """Write via ``write_fn(file_object)`` to a temp file beside ``path``, fsync, then rename.

    Readers see the old file or the complete new one, never a partial write.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            # mkstemp makes the file 0600; give it the permissions a plain open() would
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_checkpoint(obj: Any, path: str | os.PathLike) -> pathlib.Path:
    """``torch.save`` atomically. Keep ``obj`` to tensors, numbers, strings, lists and dicts."""
    return atomic_write(path, lambda f: torch.save(obj, f))


# Official FCMAE checkpoints store their argparse options; nothing else beyond torch's safe types.
SAFE_GLOBALS = [argparse.Namespace]


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load with ``weights_only=True`` (no arbitrary code); a clear error for bad files."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for truncated / foreign / unsafe files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first}") from None
