"""data=webdataset: real tar shards (JPEG crops of scikit-learn's sample photos, one corrupt sample) through the CLI
(corrupt samples counted, same seed = same run, a killed run resumes bit-identical), and the streams themselves
(processes and workers read disjoint shards that cover the epoch; a resumed epoch yields exactly its remaining batches)."""
import io
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from _pretrain_run import TINY, _assert_same_state, _cli, _env, _error_line, _main, _one_thread  # noqa: F401  (_one_thread: an autouse fixture)

from sparse_fcmae.checkpoint import load_checkpoint


def write_shards(folder: pathlib.Path, shards: int = 4, per_shard: int = 6, corrupt=(2, 3)) -> str:
    """``shards`` tar files of ``per_shard`` JPEG crops (96 x 128) of the two sample photos, with a ``.cls``; the
    sample ``corrupt`` = (shard, index) holds bytes that are no image. Returns the brace pattern."""
    import webdataset as wds
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    k = 0
    for s in range(shards):
        with wds.TarWriter(str(folder / f"train-{s:06d}.tar")) as w:
            for j in range(per_shard):
                y, x = rng.integers(0, 300), rng.integers(0, 500)
                buf = io.BytesIO()
                Image.fromarray(photos[k % 2][y:y + 96, x:x + 128]).save(buf, "JPEG", quality=90)
                jpg = b"not a jpeg at all" if (s, j) == corrupt else buf.getvalue()
                w.write({"__key__": f"sample{k:05d}", "jpg": jpg, "cls": str(k % 2).encode()})
                k += 1
    return str(folder / f"train-{{000000..{shards - 1:06d}}}.tar")


ARGS = ["data=webdataset", "data.batch_size=4", "data.shuffle_buffer=8", "optim.epochs=2"]


def _urls(pattern: str) -> str:
    return f"data.urls='{pattern}'"  # quoted: hydra would read the braces as a dict


def test_pretrain_on_shards_counts_the_corrupt_sample_and_repeats_exactly(tmp_path, capfd):
    urls = _urls(write_shards(tmp_path / "shards"))  # 24 samples, 1 corrupt: 6 steps of 4 per epoch
    a = _cli(urls, *ARGS, "data.num_workers=2", f"run_dir={tmp_path / 'a'}", cwd=tmp_path)
    assert a.returncode == 0, a.stderr[-3000:]
    assert "on webdataset (24 images" in a.stdout and "2 epochs x 6 steps" in a.stdout
    # every sample is read once per epoch: the corrupt one twice in 2 epochs, named on stderr
    assert "; 2 unreadable file read(s) skipped" in a.stdout, a.stdout
    assert "skipping unreadable sample" in a.stderr and "train-000002.tar:sample00015" in a.stderr
    b = _cli(urls, *ARGS, "data.num_workers=2", f"run_dir={tmp_path / 'b'}", cwd=tmp_path)
    assert b.returncode == 0, b.stderr[-3000:]
    ca, cb = load_checkpoint(tmp_path / "a" / "checkpoint-last.pth"), load_checkpoint(tmp_path / "b" / "checkpoint-last.pth")
    assert ca["losses"] == cb["losses"] and len(ca["losses"]) == 2
    _assert_same_state(ca["model"], cb["model"], exact=True)
    # another seed: another shard order, crops and masks
    c = _main(urls, *ARGS, "data.num_workers=0", "seed=1", f"run_dir={tmp_path / 'c'}", capfd=capfd)
    assert c.returncode == 0, c.stderr[-3000:]
    assert load_checkpoint(tmp_path / "c" / "checkpoint-last.pth")["losses"] != ca["losses"]


def test_killed_run_on_shards_resumes_bit_identical(tmp_path):
    """Two workers; checkpoints every 3 steps (an odd number of micro-batches: the resumed loader's worker 0 must
    play stream 1). SIGKILL after the first one, then the same command: the same weights as an uninterrupted run."""
    urls = _urls(write_shards(tmp_path / "shards"))
    args = [urls, *ARGS, "data.num_workers=2", "checkpoint.every_steps=3", "checkpoint.keep_last=1"]
    ref = _cli(*args, f"run_dir={tmp_path / 'ref'}", cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "sparse_fcmae.cli", "pretrain", *TINY, *args, f"run_dir={run}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (run / "checkpoint-last.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at = load_checkpoint(run / "checkpoint-last.pth")
    assert at["global_step"] < 12 and at["progress"]["micro"] % 2 == 1, "the kill must land after an odd micro-batch"
    resumed = _cli(*args, f"run_dir={run}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "restarts from its beginning" not in resumed.stderr
    a, b = load_checkpoint(tmp_path / "ref" / "checkpoint-last.pth"), load_checkpoint(run / "checkpoint-last.pth")
    _assert_same_state(a["model"], b["model"], exact=True)
    assert a["losses"] == b["losses"] and a["global_step"] == b["global_step"] == 12


# ---- the streams: split, completeness, resume ------------------------------------------------------

def _id_shards(folder: pathlib.Path, shards: int = 8, per_shard: int = 6) -> str:
    """Constant gray PNGs whose gray level is the sample's id (crops and flips keep it): ids 0..shards*per_shard-1."""
    import webdataset as wds
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"ids-{s:02d}.tar")) as w:
            for j in range(per_shard):
                i = s * per_shard + j
                buf = io.BytesIO()
                Image.fromarray(np.full((40, 40), i, np.uint8), "L").save(buf, "PNG")
                w.write({"__key__": f"id{i:03d}", "png": buf.getvalue()})
    return str(folder / f"ids-{{00..{shards - 1:02d}}}.tar")


def _ids(stream, epoch: int, start: int, workers: int) -> list[list[int]]:
    """The batches one process's DataLoader yields, as lists of sample ids."""
    from torch.utils.data import DataLoader

    stream.set_epoch(epoch, start)
    out = []
    for imgs, skipped in DataLoader(stream, batch_size=stream.batch_size, num_workers=workers):
        assert int(skipped.sum()) == 0
        gray = imgs[:, 0].mean((1, 2)) * 0.5 + 0.5  # in_chans=1 is normalised with mean 0.5, std 0.5
        out.append([round(float(g) * 255) for g in gray])
    return out


@pytest.mark.parametrize("shuffle_buffer", [0, 6])
def test_processes_and_workers_read_disjoint_shards_that_cover_the_epoch(tmp_path, shuffle_buffer):
    from sparse_fcmae.data import build_dataset

    pattern = _id_shards(tmp_path / "ids")  # 48 samples in 8 shards: 2 processes x 6 micro-batches of 4
    epochs = {}
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            stream = build_dataset("webdataset", 32, 1, urls=pattern, seed=3, shuffle_buffer=shuffle_buffer)
            stream.plan(batch_size=4, batches=6, world_size=2, rank=rank, streams=2)
            batches = _ids(stream, epoch, 0, workers=2)
            assert len(batches) == 6 and all(len(b) == 4 for b in batches)
            # a resumed epoch (3 micro-batches done, so worker 0 plays stream 1) yields exactly the rest
            assert _ids(stream, epoch, 3, workers=2) == batches[3:]
            assert _ids(stream, epoch, 0, workers=2) == batches  # same (seed, epoch): same batches
            seen.append(sorted(i for b in batches for i in b))
        assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(48))
        epochs[epoch] = seen
    assert epochs[0] != epochs[1]  # each epoch its own shard order


def test_too_few_shards_for_the_workers_is_one_line(tmp_path, capfd):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs for 2 loader workers")
    pattern = _id_shards(tmp_path / "ids", shards=1, per_shard=8)
    r = _main("data=webdataset", _urls(pattern), "data.batch_size=4", "data.num_workers=2", f"run_dir={tmp_path / 'run'}",
              capfd=capfd)
    assert "data.urls has 1 shard(s), fewer than processes x loader workers (1 x 2)" in _error_line(r)
    assert not (tmp_path / "run").exists()


def test_list_of_urls_epoch_size_and_max_images(tmp_path, capfd):
    pattern = _id_shards(tmp_path / "ids", shards=2, per_shard=8)
    listed = f"data.urls=[{tmp_path / 'ids' / 'ids-00.tar'},{tmp_path / 'ids' / 'ids-01.tar'}]"
    common = ["data=webdataset", "data.in_chans=1", "data.batch_size=4", "optim.epochs=1", "optim.warmup_epochs=0",
              "data.num_workers=0", "panels=0"]
    r = _main(listed, *common, "data.epoch_size=40", f"run_dir={tmp_path / 'a'}", capfd=capfd)  # 2.5 passes
    assert r.returncode == 0 and "(40 images" in r.stdout and "1 epoch x 10 steps" in r.stdout, r.stderr[-2000:]
    r = _main(_urls(pattern), *common, "data.max_images=8", f"run_dir={tmp_path / 'b'}", capfd=capfd)
    assert r.returncode == 0 and "(8 images" in r.stdout and "1 epoch x 2 steps" in r.stdout, r.stderr[-2000:]


def test_shard_members_decode_as_image_folder_files(tmp_path):
    """.npy (4 bands, C x H x W), 16-bit .tif and RGBA .png members: the same tensors, crops and flips as the same
    files in an image folder (the folder pipeline is the oracle: the channel rule lives in one place)."""
    import webdataset as wds
    from PIL import Image

    from sparse_fcmae.data import RobustImageFolder, SeededSamples, build_dataset

    rng = np.random.default_rng(0)
    cls = tmp_path / "folder" / "cls"
    cls.mkdir(parents=True)
    np.save(cls / "0.npy", rng.random((4, 48, 40)).astype(np.float32))
    Image.fromarray(rng.integers(0, 65536, (40, 48), dtype=np.uint16)).save(cls / "1.tif")
    Image.fromarray(rng.integers(0, 256, (44, 52, 4), dtype=np.uint8), "RGBA").save(cls / "2.png")
    files = sorted(cls.iterdir())
    with wds.TarWriter(str(tmp_path / "mixed.tar")) as w:
        for f in files:
            w.write({"__key__": f.stem, f.suffix.lstrip("."): f.read_bytes()})
    stream = build_dataset("webdataset", 32, 4, urls=str(tmp_path / "mixed.tar"), seed=5)
    folder = SeededSamples(RobustImageFolder(str(tmp_path / "folder"), 32, in_chans=4), seed=5)
    for i in range(3):
        got, want = stream[i][0], folder[i][0]
        assert got.shape == (4, 32, 32) and torch.equal(got, want), files[i].name
