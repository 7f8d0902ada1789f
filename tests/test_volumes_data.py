"""``data=volumes``: real NIfTI files written with nibabel and ``.npy`` files, read back against numpy; clipping,
normalisation, crops and flips against explicit numpy oracles; per-sample seeding; pretraining through the CLI with
a corrupt file skipped and counted; a SIGKILLed run resumed bit-identical to an uninterrupted one."""
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from _pretrain_run import _assert_same_state, _env, _one_thread  # noqa: F401  (_one_thread: an autouse fixture)

from sparse_fcmae.checkpoint import load_checkpoint
from sparse_fcmae.data import SeededSamples, build_dataset
from sparse_fcmae.data.volumes import VolumeTransform, load_volume

OPTS = {"clip": None, "clip_percentiles": None, "normalize": "none"}


def _nii(path, arr, affine=None, **header):
    img = nib.Nifti1Image(arr, np.eye(4) if affine is None else affine)
    for k, v in header.items():
        img.header[k] = v
    nib.save(img, str(path))
    return path


def _folder(d, n=4, shape=(70, 66, 40), seed=0):
    """``n`` single-channel volumes: NIfTI (.nii.gz and .nii) and .npy, of a size that needs a crop and a pad."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = rng.normal(100 + 10 * i, 20, shape).astype(np.float32)
        if i % 3 == 2:
            np.save(d / f"v{i}.npy", arr)
        else:
            _nii(d / f"v{i}.nii{'.gz' if i % 2 else ''}", arr)
    return d


def test_nifti_and_npy_read_as_numpy_says(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(5, 6, 7)).astype(np.float32)
    vol = load_volume(str(_nii(tmp_path / "a.nii.gz", a)), 1)
    assert vol.shape == (1, 5, 6, 7) and np.array_equal(vol[0].numpy(), a)
    # nibabel applies the header's scaling: int16 voxels x slope + intercept
    raw = rng.integers(-500, 500, (4, 5, 6)).astype(np.int16)
    scaled = load_volume(str(_nii(tmp_path / "s.nii", raw, scl_slope=2.0, scl_inter=-3.0)), 1)
    assert np.array_equal(scaled[0].numpy(), raw.astype(np.float32) * 2 - 3)
    # a 4D NIfTI keeps its channels on the last axis -> channels first
    four = rng.normal(size=(5, 6, 7, 2)).astype(np.float32)
    v4 = load_volume(str(_nii(tmp_path / "m.nii.gz", four)), 2)
    assert v4.shape == (2, 5, 6, 7) and all(np.array_equal(v4[c].numpy(), four[..., c]) for c in range(2))
    # .npy: (C, D, H, W) or (D, H, W, C), told apart by in_chans, or named
    np.save(tmp_path / "c.npy", four.transpose(3, 0, 1, 2))
    np.save(tmp_path / "l.npy", four)
    for name in ("c.npy", "l.npy"):
        assert torch.equal(load_volume(str(tmp_path / name), 2), v4), name
    cube = rng.normal(size=(3, 4, 4, 3)).astype(np.float32)  # first and last axes both 3: ambiguous
    np.save(tmp_path / "amb.npy", cube)
    with pytest.raises(ValueError, match="data.npy_layout=cdhw"):
        load_volume(str(tmp_path / "amb.npy"), 3)
    assert np.array_equal(load_volume(str(tmp_path / "amb.npy"), 3, "dhwc").numpy(), cube.transpose(3, 0, 1, 2))
    with pytest.raises(ValueError, match="has 1 channel.*data.in_chans=2: set data.in_chans=1"):
        load_volume(str(tmp_path / "a.nii.gz"), 2)


def test_intensity_options_against_numpy(tmp_path):
    rng = np.random.default_rng(2)
    arr = rng.normal(50, 30, (2, 32, 32, 32)).astype(np.float32)
    x = torch.from_numpy(arr)
    per = arr.reshape(2, -1)

    def run(**opts):
        return VolumeTransform(32, False, {**OPTS, "flip": False, **opts})(x.clone()).numpy()

    assert np.array_equal(run(), arr)
    z = (arr - per.mean(1)[:, None, None, None]) / per.std(1, ddof=1)[:, None, None, None]
    np.testing.assert_allclose(run(normalize="zscore"), z, rtol=1e-4, atol=1e-4)
    mm = (arr - per.min(1)[:, None, None, None]) / np.ptp(per, 1)[:, None, None, None]
    np.testing.assert_allclose(run(normalize="minmax"), mm, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(run(clip=[20, 60]), np.clip(arr, 20, 60))
    lo, hi = np.percentile(per, [5, 95], axis=1)
    clipped = np.stack([np.clip(arr[c], lo[c], hi[c]) for c in range(2)])
    np.testing.assert_allclose(run(clip_percentiles=[5, 95]), clipped, rtol=1e-6)
    assert run(clip_percentiles=[5, 95]).max(axis=(1, 2, 3)).tolist() != run().max(axis=(1, 2, 3)).tolist()


def test_crops_and_flips_are_real_sub_blocks_seeded_per_sample(tmp_path):
    # voxel values encode their position: a crop's first voxel tells its offset and flips
    d, h, w = 40, 70, 20
    pos = (np.arange(d)[:, None, None] * 10000 + np.arange(h)[None, :, None] * 100 + np.arange(w)[None, None, :])
    (tmp_path / "p").mkdir()
    np.save(tmp_path / "p" / "a.npy", pos.astype(np.float32))
    kw = dict(name="volumes", img_size=32, in_chans=1, root=str(tmp_path / "p"),
              volume={"clip": None, "clip_percentiles": None, "normalize": "none"})
    train = SeededSamples(build_dataset(train=True, **kw), seed=5)
    padded = np.pad(pos, ((0, 0), (0, 0), (6, 6)), constant_values=0)  # w=20 -> 32, centred, with the minimum (0)
    seen = set()
    for epoch in range(12):
        v = train[(0, epoch)][0][0].numpy()
        assert torch.equal(train[(0, epoch)][0], SeededSamples(build_dataset(train=True, **kw), seed=5)[(0, epoch)][0])
        found = []
        for f in range(8):  # undo each combination of flips; the first real voxel then names the offset
            u = np.flip(v, [a for a in range(3) if f >> a & 1])
            z, y = divmod(int(u[0, 0, 6]) // 100, 100)
            if z + 32 <= d and y + 32 <= h and np.array_equal(u, padded[z:z + 32, y:y + 32]):
                found.append((z, y, f))
        assert len(found) == 1, epoch
        seen.add(found[0])
    assert len(seen) >= 10 and len({f for *_, f in seen}) >= 4  # offsets and flips vary with the epoch
    centre = build_dataset(train=False, **kw)[0][0][0].numpy()  # evaluation: centred, never flipped
    assert np.array_equal(centre, padded[4:36, 19:51])


def test_pretrain_on_a_nifti_folder_skips_and_counts_a_corrupt_file(tmp_path, capfd):
    from sparse_fcmae.cli import main

    root = _folder(tmp_path / "vols", n=5)
    (root / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08 truncated")
    capfd.readouterr()
    code = main(["pretrain", "model.spatial_dims=3", "data=volumes", f"data.root={root}", "device=cpu",
                 "data.num_workers=0", "model.decoder_dim=32", "optim.epochs=1", "data.batch_size=3", "panels=2",
                 "data.clip_percentiles=[1,99]", f"run_dir={tmp_path / 'run'}"])
    out, err = capfd.readouterr()
    assert code == 0, err[-3000:]
    assert "on volumes (6 volumes, 64^3 voxels, 1 ch)" in out
    assert "1 unreadable file read(s) skipped" in out
    # named once (tqdm's bar may share its line)
    assert err.count("warning: skipping unreadable") == 1
    assert f"warning: skipping unreadable volume {root / 'broken.nii.gz'}: " in err
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint-last.pth")
    assert ckpt["global_step"] == 2 and ckpt["model"]["pred.weight"].shape == (32 ** 3, 32, 1, 1, 1)
    assert (tmp_path / "run" / "reconstruction.png").is_file()


def test_class_folders_give_labels_and_a_flat_folder_none(tmp_path):
    for c in ("ct", "mr"):
        _folder(tmp_path / "lab" / c, n=2, shape=(32, 32, 32), seed=len(c))
    kw = dict(name="volumes", img_size=32, in_chans=1, volume={**OPTS, "normalize": "zscore"})
    lab = build_dataset(root=str(tmp_path / "lab"), **kw)
    assert lab.classes == ["ct", "mr"] and lab.num_classes == 2 and [lab[i][1] for i in range(4)] == [0, 0, 1, 1]
    flat = build_dataset(root=str(_folder(tmp_path / "flat", n=2, shape=(32, 32, 32))), **kw)
    assert flat.num_classes == 1 and {flat[i][1] for i in range(2)} == {0}


def test_sigkill_then_resume_is_bit_identical_whatever_the_workers(tmp_path):
    root = _folder(tmp_path / "vols", n=6)
    args = ["model.spatial_dims=3", "data=volumes", f"data.root={root}", "device=cpu", "model.decoder_dim=32",
            "data.batch_size=2", "optim.epochs=2", "checkpoint.every_steps=2", "checkpoint.keep_last=1", "panels=0"]

    def cli(run, workers, **kw):
        cmd = [sys.executable, "-m", "sparse_fcmae.cli", "pretrain", *args, f"run_dir={run}",
               f"data.num_workers={workers}"]
        return (subprocess.Popen if kw else subprocess.run)(cmd, cwd=tmp_path, env=_env(), **(kw or dict(
            capture_output=True, text=True, timeout=900)))

    ref = cli(tmp_path / "ref", 0)
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "killed"
    proc = cli(run, 2, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (run / "checkpoint-last.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(run / "checkpoint-last.pth")["progress"]["micro"] > 0, "the kill must land mid-epoch"
    resumed = cli(run, 2)  # the reference ran with 0 workers
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr[-3000:]
    a, b = load_checkpoint(tmp_path / "ref" / "checkpoint-last.pth"), load_checkpoint(run / "checkpoint-last.pth")
    _assert_same_state(a["model"], b["model"], exact=True)
    assert a["losses"] == b["losses"] and a["global_step"] == b["global_step"] == 6
