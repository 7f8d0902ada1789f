"""Data a user brings: missing, empty or corrupt folders, the channel rule, seeded order, synthetic sets."""
import pathlib

import numpy as np
import pytest
import torch
from _pretrain_run import _error_line, _main, _one_thread  # noqa: F401  (_one_thread: an autouse fixture)

from sparse_fcmae.data import RobustImageFolder, SeededSamples, load_image_chw


def _png(path: pathlib.Path, mode: str, size=(40, 48), seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    bands = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    arr = rng.integers(0, 256, (size[1], size[0], bands), dtype=np.uint8)
    Image.fromarray(arr[:, :, 0] if bands == 1 else arr, mode).save(path)
    return arr


@pytest.mark.parametrize("layout", ["missing", "empty", "flat"])
def test_missing_or_empty_data_folder_is_one_clear_error_before_anything_starts(tmp_path, layout, capfd):
    root = tmp_path / "data"
    if layout != "missing":
        (root / "cls").mkdir(parents=True)
    if layout == "flat":  # images without a class folder
        (root / "cls").rmdir()
        _png(root / "a.png", "RGB")
    r = _main("data=imagefolder", f"data.root={root}", "data.num_workers=0", f"run_dir={tmp_path / 'run'}", capfd=capfd)
    line = _error_line(r)
    assert ("not found" if layout == "missing" else "no images found") in line and str(root) in line
    if layout == "flat":
        assert "class sub-folders" in line
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_unreadable_files_are_skipped_and_counted(tmp_path, capfd):
    cls = tmp_path / "data" / "cls"
    cls.mkdir(parents=True)
    for i in range(4):
        _png(cls / f"good{i}.png", "RGB", seed=i)
    (cls / "bad0.png").write_bytes(b"not an image at all")
    good = (cls / "good0.png").read_bytes()
    (cls / "bad1.png").write_bytes(good[: len(good) // 3])  # truncated
    ds = SeededSamples(RobustImageFolder(str(tmp_path / "data"), 32, in_chans=3), seed=0)
    out = [ds[(i, 0)] for i in range(len(ds))]
    assert len(out) == 6 and all(img.shape == (3, 32, 32) and torch.isfinite(img).all() for img, _ in out)
    assert sum(n for _, n in out) == 2  # each bad file replaced by the next readable one, and counted once
    assert "skipping unreadable image" in capfd.readouterr().err


def test_channel_rule_for_grayscale_rgb_rgba_and_npy(tmp_path):
    rgba = _png(tmp_path / "x.png", "RGBA")
    x4 = load_image_chw(str(tmp_path / "x.png"), 4)
    assert x4.shape == (4, 48, 40) and torch.equal(x4, torch.from_numpy(rgba).permute(2, 0, 1).float() / 255)
    assert load_image_chw(str(tmp_path / "x.png"), 3).shape == (3, 48, 40)
    gray = _png(tmp_path / "g.png", "L")
    g2 = load_image_chw(str(tmp_path / "g.png"), 2)  # grayscale repeated to 2 channels
    assert torch.equal(g2[0], g2[1]) and torch.equal(g2[0], torch.from_numpy(gray[:, :, 0]).float() / 255)
    arr = np.random.default_rng(0).random((6, 20, 30)).astype(np.float32)  # (C, H, W), 6 bands
    np.save(tmp_path / "m.npy", arr)
    m4 = load_image_chw(str(tmp_path / "m.npy"), 4)  # truncated to the first 4
    assert torch.equal(m4, torch.from_numpy(arr[:4]))


def test_seeded_samples_do_not_touch_global_rng_and_repeat_exactly(tmp_path):
    from sparse_fcmae.data import DigitsDataset

    ds = SeededSamples(DigitsDataset(img_size=32, flip=True), seed=3)
    state = torch.get_rng_state()
    imgs = [ds[(0, e)][0] for e in range(16)]  # one sample over 16 epochs: flipped about half the time
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, ds[(0, e)][0]) for e, x in enumerate(imgs))  # same (index, epoch), same image
    flipped = sum(not torch.equal(x, imgs[0]) for x in imgs)
    assert 0 < flipped < 16 and all(torch.equal(x, imgs[0]) or torch.equal(x, imgs[0].flip(-1)) for x in imgs)


def test_synthetic_data_any_channel_count_deterministic():
    from sparse_fcmae.data import SyntheticDataset

    ds = SyntheticDataset(num_images=8, img_size=64, in_chans=4, seed=1)
    a, b = ds[3][0], ds[3][0]
    assert a.shape == (4, 64, 64) and torch.equal(a, b) and not torch.equal(a, ds[4][0])
    assert not torch.equal(a, SyntheticDataset(8, 64, 4, seed=2)[3][0])
    assert 0.3 < a.std() < 3.0  # a real image-like signal, not constant
