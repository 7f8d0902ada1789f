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


def temp_beside(path: str | os.PathLike, suffix: str = ".tmp") -> pathlib.Path:
    """A new empty temp file in ``path``'s folder (so a rename onto ``path`` is atomic), with the
    permissions a plain ``open()`` would give (mkstemp makes 0600)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
    finally:
        os.close(fd)
    return pathlib.Path(tmp)


def temp_dir_beside(path: str | os.PathLike, suffix: str = ".partial") -> pathlib.Path:
    """A new empty temp folder in ``path``'s folder (so a rename onto ``path`` is atomic), with the
    permissions a plain ``mkdir()`` would give (mkdtemp makes 0700)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a folder's entries (new files, renames) durable."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename a complete, fsynced temp file (or temp folder, onto a missing or empty ``path``) onto ``path``
    and make the rename durable."""
    os.replace(tmp, path)
    fsync_dir(pathlib.Path(path).parent)


def atomic_write(path: str | os.PathLike, write_fn) -> pathlib.Path:
    """Write via ``write_fn(file_object)`` to a temp file beside ``path``, fsync, then rename.

    Readers see the old file or the complete new one, never a partial write.
    """
    path = pathlib.Path(path)
    tmp = temp_beside(path)
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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
