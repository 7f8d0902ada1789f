"""finetune / linprobe on WebDataset shards, through the CLI: real shards (JPEG crops of scikit-learn's sample
photos, 2 classes in ``.cls``, one corrupt sample in train and in val); top-1 recomputed here from the saved model and
the val shards read with tarfile and PIL (the oracle: no code of the package); corrupt samples counted; SIGTERM mid-epoch
with 2 loader workers, then the same command ends bit-identical to an uninterrupted run; the label errors."""
import io
import json
import pathlib
import re
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import timm
import torch
from _pretrain_run import _env, _one_thread  # noqa: F401  (_one_thread: an autouse fixture)
from PIL import Image

from sparse_fcmae.checkpoint import load_checkpoint
from sparse_fcmae.cli import main

PX = 64
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])  # ImageNet, as torchvision documents


def write_shards(folder: pathlib.Path, name: str, shards: int, per_shard: int, size: tuple, corrupt=None, seed=0,
                 label=lambda k: k % 2) -> str:
    """``shards`` tar files of ``per_shard`` JPEG crops (``size`` = (h, w)) of the two sample photos; the class is the
    photo, written as webdataset writes an int (``.cls``: its digits; ``label(k)`` None: no ``.cls``). The sample
    ``corrupt`` = (shard, index) holds bytes that are no image. Returns the brace pattern."""
    import webdataset as wds
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    k = 0
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{name}-{s:06d}.tar")) as w:
            for j in range(per_shard):
                y, x = rng.integers(0, 427 - size[0]), rng.integers(0, 640 - size[1])
                buf = io.BytesIO()
                Image.fromarray(photos[k % 2][y:y + size[0], x:x + size[1]]).save(buf, "JPEG", quality=90)
                sample = {"__key__": f"{name}{k:05d}", "jpg": b"not a jpeg at all" if (s, j) == corrupt else buf.getvalue()}
                if label(k) is not None:
                    sample["cls"] = label(k)
                w.write(sample)
                k += 1
    return str(folder / f"{name}-{{000000..{shards - 1:06d}}}.tar")


def _val_oracle(checkpoint: pathlib.Path, folder: pathlib.Path) -> tuple[float, int, int]:
    """Top-1 of the saved classifier on the val shards, read here: every member of every tar, grouped by key; images
    PIL decodes are centre-cropped to 64 x 64 (they are 64 x 80: no resize) and normalised; the rest counted as
    corrupt. ``(top-1 %, scored, corrupt)``."""
    model = timm.create_model("convnextv2_atto", num_classes=2, in_chans=3)
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    model.eval()
    samples = {}
    for shard in sorted(folder.glob("val-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.rsplit(".", 1)
                samples.setdefault((shard.name, key), {})[ext] = tar.extractfile(m).read()
    xs, ys, corrupt = [], [], 0
    for sample in samples.values():
        try:
            img = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"), dtype=np.float64) / 255
        except Exception:
            corrupt += 1
            continue
        left = (img.shape[1] - PX) // 2
        xs.append((img[:, left:left + PX] - MEAN) / STD)
        ys.append(int(sample["cls"]))
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        pred = model(x).argmax(1)
    return 100.0 * (pred == torch.tensor(ys)).sum().item() / len(ys), len(ys), corrupt


def _data(tmp_path: pathlib.Path, shards: int = 4) -> list[str]:
    """Train: ``shards`` x 6 crops of 96 x 128 (one corrupt); val: 2 x 4 crops of 64 x 80 (one corrupt)."""
    folder = tmp_path / "shards"
    train = write_shards(folder, "train", shards, 6, (96, 128), corrupt=(1, 2))
    val = write_shards(folder, "val", 2, 4, (PX, 80), corrupt=(1, 1), seed=1)
    return ["data=webdataset", f"data.urls='{train}'", f"data.val_urls='{val}'", "data.num_classes=2",
            f"data.img_size={PX}", "data.batch_size=4", "data.shuffle_buffer=8"]


@pytest.mark.parametrize("mode", ["finetune", "linprobe"])
def test_finetune_and_linprobe_on_shards_score_the_val_shards_once(mode, tmp_path, capfd):
    args = _data(tmp_path)
    run = tmp_path / "run"
    workers = "data.num_workers=2" if mode == "finetune" else "data.num_workers=0"
    cmd = [mode, *args, workers, "optim.epochs=2", "optim.warmup_epochs=0", f"run_dir={run}"]
    capfd.readouterr()
    rc = main(cmd)
    out, err = capfd.readouterr()
    assert rc == 0, err[-3000:]
    res = json.loads((run / "results.json").read_text())
    top1, scored, corrupt = _val_oracle(run / "checkpoint-last.pth", tmp_path / "shards")
    assert (scored, corrupt) == (7, 1)
    assert res["top1"] == pytest.approx(top1, abs=1e-9) and f"top-1 {top1:.2f}% (7 held-out images)" in out
    # the corrupt samples once per epoch (finetune: 2 epochs; linprobe reads each split once, for its features)
    n = 2 if mode == "finetune" else 1
    assert res["skipped_files"] == {"train": n, "val": n}, res["skipped_files"]
    assert "train-000001.tar:train00008" in err and "val-000001.tar:val00005" in err
    assert main(cmd) == 0  # the same command on the finished run: nothing to train, the same summary
    assert f"top-1 {top1:.2f}% (7 held-out images)" in capfd.readouterr().out


# 2 loader workers, the whole fine-tuning augmentation (RandAugment, random erasing, Mixup/CutMix) and EMA:
# every piece of state a resume must carry; 16 shards x 6 samples = 24 steps of 4 per epoch
RESUME = ["data.num_workers=2", "optim.epochs=3", "optim.warmup_epochs=1", "aug.rand_augment=rand-m9-mstd0.5-inc1",
          "aug.reprob=0.25", "aug.mixup=0.8", "aug.cutmix=1.0", "ema.enabled=true"]


def _cmd(args, run):
    return [sys.executable, "-m", "sparse_fcmae.cli", "finetune", *args, *RESUME, f"run_dir={run}"]


def test_sigterm_mid_epoch_on_shards_then_the_same_command_ends_bit_identical(tmp_path):
    args = _data(tmp_path, shards=16)
    ref = subprocess.run(_cmd(args, tmp_path / "ref"), cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=900)
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "stopped"
    proc = subprocess.Popen(_cmd(args, run), cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 600
    while not (run / "checkpoint-last.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)  # into epoch 2: its loader workers start, then 24 steps of ~0.1 s
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    line = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning: skipping unreadable")]
    assert len(line) == 1 and "[finetune] stopped by SIGTERM after step" in line[0], err[-3000:]
    stopped = load_checkpoint(run / "checkpoint-last.pth")
    assert 24 < stopped["global_step"] < 72 and stopped["progress"]["micro"] > 0, stopped["progress"]
    assert stopped["global_step"] == int(re.search(r"after step (\d+)", line[0]).group(1))

    resumed = subprocess.run(_cmd(args, run), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[finetune] resuming from" in resumed.stdout and "restarts from its beginning" not in resumed.stderr
    a, b = load_checkpoint(tmp_path / "ref" / "checkpoint-last.pth"), load_checkpoint(run / "checkpoint-last.pth")
    for key in ("model", "model_ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (tmp_path / "ref", run))
    assert ra["history"] == rb["history"] and len(ra["history"]) == 3
    assert ra["skipped_files"] == rb["skipped_files"] == {"train": 3, "val": 3}


@pytest.mark.parametrize("bad, needle", [
    (None, "sample {shard}:train00014 has no .cls member (it has: jpg): fine-tuning needs a class index in every sample"),
    ("cat", "sample {shard}:train00014: .cls must be an integer class index, got b'cat'"),
    (2, "sample {shard}:train00014: label 2 is out of range for data.num_classes=2 (labels 0..1)"),
])
def test_a_bad_label_met_by_a_loader_worker_is_one_line(bad, needle, tmp_path, capfd):
    """The sample sits in the third shard (the check at start-up reads the first): a loader worker meets it."""
    train = write_shards(tmp_path / "shards", "train", 4, 6, (96, 128), label=lambda k: bad if k == 14 else k % 2)
    val = write_shards(tmp_path / "shards", "val", 2, 4, (PX, 80), seed=1)
    capfd.readouterr()
    rc = main(["finetune", "data=webdataset", f"data.urls='{train}'", f"data.val_urls='{val}'", "data.num_classes=2",
               f"data.img_size={PX}", "data.batch_size=4", "data.num_workers=2", "optim.epochs=1",
               "optim.warmup_epochs=0", f"run_dir={tmp_path / 'run'}"])
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0] == "error: " + needle.format(shard=tmp_path / "shards" / "train-000002.tar"), lines
    assert not (tmp_path / "run" / "results.json").exists()


def test_shard_samples_get_the_image_folder_fine_tuning_augmentation_and_evaluation_crop(tmp_path):
    """The same JPEGs as an image folder and as a shard, split by each config's own path (``build_splits``) with
    RandAugment, random erasing and a crop scale: sample i of the shard equals image i of the folder, augmented with
    the same seed (the folder pipeline is the oracle: the fine-tuning transform lives in one place); as validation
    data, both get the same evaluation crop (``aug.crop_pct``: resize, centre crop)."""
    import webdataset as wds
    from sklearn.datasets import load_sample_images

    from sparse_fcmae.cli import compose
    from sparse_fcmae.data import SeededSamples
    from sparse_fcmae.finetune import build_splits

    rng = np.random.default_rng(0)
    photos = load_sample_images().images
    with wds.TarWriter(str(tmp_path / "train.tar")) as w:
        for i in range(6):
            cls = "ab"[i // 3]
            (tmp_path / "folder" / cls).mkdir(parents=True, exist_ok=True)
            y, x = rng.integers(0, 300), rng.integers(0, 500)
            Image.fromarray(photos[i // 3][y:y + 96, x:x + 128]).save(tmp_path / "folder" / cls / f"{i}.jpg", quality=90)
            w.write({"__key__": f"s{i}", "jpg": (tmp_path / "folder" / cls / f"{i}.jpg").read_bytes(), "cls": i // 3})
    aug = ["aug.rand_augment=rand-m9-mstd0.5-inc1", "aug.reprob=0.5", "data.crop_scale=[0.3,0.9]", "aug.crop_pct=0.875",
           f"data.img_size={PX}"]
    shards = compose("finetune", ["data=webdataset", f"data.urls={tmp_path / 'train.tar'}",
                                  f"data.val_urls={tmp_path / 'train.tar'}", "data.num_classes=2", "data.batch_size=2", *aug])
    folder = compose("finetune", ["data=imagefolder", f"data.root={tmp_path / 'folder'}",
                                  f"data.val_root={tmp_path / 'folder'}", *aug])
    (stream, val, *_), (train, test, *_) = build_splits(shards), build_splits(folder)
    want = SeededSamples(train, folder.seed, labels=True)
    for i in range(6):
        got, ref = stream[i][0], want[i][0]
        assert got.shape == (3, PX, PX) and torch.equal(got, ref), i
        assert torch.equal(val[i][0], test[i][0]), i
