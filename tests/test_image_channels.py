"""How image files become (in_chans, H, W) tensors: bit depth, palettes, .npy layouts."""
import numpy as np
import pytest
import torch
from PIL import Image

from sparse_fcmae.data import load_image_chw


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grayscale_is_scaled_not_clipped_for_any_channel_count(tmp_path, suffix):
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # every 16-bit value once, 0..65535
    path = tmp_path / f"ramp{suffix}"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as im:
        assert im.mode in ("I;16", "I")  # really a 16-bit file
    want = torch.from_numpy(ramp.astype(np.float64) / 65535.0)
    for in_chans in (1, 3, 4):
        x = load_image_chw(str(path), in_chans)
        assert x.shape == (in_chans, 256, 256)
        for c in range(in_chans):
            torch.testing.assert_close(x[c].double(), want, rtol=0, atol=1e-7)


PALETTE = np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0], [30, 160, 90]], dtype=np.uint8)  # index 0 = white


def _palette_png(path, transparent_index=None):
    idx = np.random.default_rng(0).integers(0, len(PALETTE), (24, 40)).astype(np.uint8)
    idx[0, :4] = [0, 1, 2, 3]
    im = Image.fromarray(idx, "P")
    im.putpalette(PALETTE.flatten().tolist())
    kw = {} if transparent_index is None else {"transparency": transparent_index}
    im.save(path, **kw)
    with Image.open(path) as back:
        assert back.mode == "P"
    return idx


@pytest.mark.parametrize("in_chans", [1, 2, 3, 4, 5])
def test_palette_png_gives_colours_not_indices(tmp_path, in_chans):
    idx = _palette_png(tmp_path / "p.png")
    rgb = torch.from_numpy(PALETTE[idx].astype(np.float32) / 255).permute(2, 0, 1)  # the colours, looked up here
    x = load_image_chw(str(tmp_path / "p.png"), in_chans)
    assert x.shape == (in_chans, 24, 40)
    if in_chans == 1:  # ITU-R 601 luma, as PIL's "L"
        luma = (rgb * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0)
        torch.testing.assert_close(x[0], luma, rtol=0, atol=1 / 255)
        assert x[0, 0, 0] == 1.0  # white stays white
    else:  # RGB repeated cyclically to in_chans
        torch.testing.assert_close(x, rgb[[c % 3 for c in range(in_chans)]], rtol=0, atol=0)


def test_palette_with_transparency_and_gray_alpha_become_rgba(tmp_path):
    idx = _palette_png(tmp_path / "t.png", transparent_index=3)
    x = load_image_chw(str(tmp_path / "t.png"), 4)
    rgb = torch.from_numpy(PALETTE[idx].astype(np.float32) / 255).permute(2, 0, 1)
    alpha = torch.from_numpy((idx != 3).astype(np.float32))
    torch.testing.assert_close(x, torch.cat([rgb, alpha[None]]), rtol=0, atol=0)
    gray = np.random.default_rng(1).integers(0, 256, (24, 40, 2), dtype=np.uint8)
    Image.fromarray(gray, "LA").save(tmp_path / "la.png")
    la = load_image_chw(str(tmp_path / "la.png"), 4)
    g, a = (torch.from_numpy(gray[:, :, i].astype(np.float32) / 255) for i in (0, 1))
    torch.testing.assert_close(la, torch.stack([g, g, g, a]), rtol=0, atol=0)


@pytest.mark.parametrize("in_chans", [20, 3])
def test_npy_with_more_than_16_bands_either_layout(tmp_path, in_chans):
    bands = np.random.default_rng(0).random((20, 48, 64)).astype(np.float32)  # (C, H, W): 20 bands
    np.save(tmp_path / "chw.npy", bands)
    np.save(tmp_path / "hwc.npy", bands.transpose(1, 2, 0))  # (H, W, C)
    want = torch.from_numpy(bands[:in_chans])
    for name in ("chw.npy", "hwc.npy"):
        assert torch.equal(load_image_chw(str(tmp_path / name), in_chans), want), name
    assert torch.equal(load_image_chw(str(tmp_path / "chw.npy"), 20, "chw"), torch.from_numpy(bands))
    assert load_image_chw(str(tmp_path / "chw.npy"), 64, "hwc").shape == (64, 20, 48)  # forced: as the user says


def test_ambiguous_npy_layout_is_one_error_naming_the_setting(tmp_path, capfd):
    from sparse_fcmae.cli import main

    cls = tmp_path / "data" / "cls"
    cls.mkdir(parents=True)
    np.save(cls / "cube.npy", np.random.default_rng(0).random((64, 32, 64)).astype(np.float32))
    common = ["pretrain", "data=imagefolder", f"data.root={tmp_path / 'data'}", "data.in_chans=4", "data.img_size=64",
              "data.num_workers=0", f"run_dir={tmp_path / 'run'}"]
    capfd.readouterr()
    assert main(common) == 2
    err = [ln for ln in capfd.readouterr().err.strip().splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error:") and "data.npy_layout" in err[0] and "cube.npy" in err[0]
    assert not (tmp_path / "run").exists()


def test_loader_workers_are_capped_at_the_usable_cpus():
    import os

    from sparse_fcmae.data import loader_workers

    cpus = len(os.sched_getaffinity(0))
    assert loader_workers(10_000) == cpus and loader_workers(0) == 0 and loader_workers(1) == min(1, cpus)
