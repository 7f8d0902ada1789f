"""Checkpoints: atomic writes and no arbitrary unpickling."""
import os
import pickle

import pytest
import torch

from sparse_fcmae.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_round_trip(tmp_path):
    obj = {"model": {"w": torch.randn(3)}, "epoch": 4}
    save_checkpoint(obj, tmp_path / "c.pth")
    back = load_checkpoint(tmp_path / "c.pth")
    assert back["epoch"] == 4 and torch.equal(back["model"]["w"], obj["model"]["w"])


def test_arbitrary_code_is_refused(tmp_path):
    with open(tmp_path / "evil.pth", "wb") as f:
        torch.save({"x": _Evil()}, f, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "evil.pth")


def test_truncated_file_is_a_clear_error(tmp_path):
    save_checkpoint({"w": torch.randn(1000)}, tmp_path / "c.pth")
    data = (tmp_path / "c.pth").read_bytes()
    (tmp_path / "t.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "t.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pth")


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "c.pth"
    save_checkpoint({"v": 1}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint({"v": Boom()}, path)
    assert load_checkpoint(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]


def test_written_files_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        save_checkpoint({"v": 1}, tmp_path / "c.pth")
    finally:
        os.umask(old)
    assert (tmp_path / "c.pth").stat().st_mode & 0o777 == 0o644
