"""Fine-tuning and linear probing on image folders of real photographs, through the CLI."""
import json

import numpy as np
import pytest
import timm
import torch
from _pretrain_run import _one_thread  # noqa: F401  (an autouse fixture: one thread)
from PIL import Image

from sparse_fcmae.checkpoint import load_checkpoint
from sparse_fcmae.cli import main

PX = 64
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])  # ImageNet, as torchvision documents


def _photo_folders(root, n_train=4, n_val=3):
    """JPEG crops of scikit-learn's two bundled photographs: class = photo; one corrupt file in train."""
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    for name, photo in zip(("china", "flower"), data.images):
        h, w, _ = photo.shape
        for split, n, y0 in (("train", n_train, 0), ("val", n_val, h // 2)):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                x0 = i * (w - PX) // max(n - 1, 1)
                Image.fromarray(photo[y0 + 40: y0 + 40 + PX, x0: x0 + PX]).save(root / split / name / f"{i}.jpg", quality=90)
    (root / "train" / "china" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG after all")
    return root / "train", root / "val"


def _top1_oracle(checkpoint, val_root):
    """Top-1 of the saved model on the val folder, decoded and normalised here (64 px files: no resize needed)."""
    model = timm.create_model("convnextv2_atto", num_classes=2, in_chans=3)
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    model.eval()
    xs, ys = [], []
    for label, cls in enumerate(sorted(p.name for p in val_root.iterdir())):
        for f in sorted((val_root / cls).iterdir()):
            xs.append((np.asarray(Image.open(f).convert("RGB"), dtype=np.float64) / 255 - MEAN) / STD)
            ys.append(label)
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        pred = model(x).argmax(1)
    return 100.0 * (pred == torch.tensor(ys)).sum().item() / len(ys), len(ys)


@pytest.mark.parametrize("mode", ["finetune", "linprobe"])
def test_finetune_and_linprobe_on_photo_folders_skip_a_corrupt_file(mode, tmp_path, capfd):
    train, val = _photo_folders(tmp_path / "photos")
    run = tmp_path / "run"
    rc = main([mode, "data=imagefolder", f"data.root={train}", f"data.val_root={val}", f"data.img_size={PX}",
               "data.batch_size=16", "data.num_workers=0", "optim.epochs=1", "optim.warmup_epochs=0", f"run_dir={run}"])
    out, err = capfd.readouterr()
    assert rc == 0, err[-2000:]
    res = json.loads((run / "results.json").read_text())
    top1, n_val = _top1_oracle(run / "checkpoint-last.pth", val)
    assert n_val == 6 and res["top1"] == pytest.approx(top1, abs=1e-9)
    assert f"top-1 {top1:.2f}% (6 held-out images)" in out
    assert res["skipped_files"] == {"train": 1, "val": 0}  # the corrupt file: skipped, counted once
    assert "broken.jpg" in err and "skipping unreadable image" in err


def test_a_corrupt_file_is_reported_once_per_run_with_two_workers(tmp_path, capfd):
    train, val = _photo_folders(tmp_path / "photos", n_train=3, n_val=1)
    run = tmp_path / "run"
    rc = main(["finetune", "data=imagefolder", f"data.root={train}", f"data.val_root={val}", f"data.img_size={PX}",
               "data.batch_size=16", "data.num_workers=2", "optim.epochs=3", "optim.warmup_epochs=0", f"run_dir={run}"])
    out, err = capfd.readouterr()
    assert rc == 0, err[-2000:]
    assert err.count("skipping unreadable image") == 1 and err.count("broken.jpg") == 1, err
    res = json.loads((run / "results.json").read_text())
    assert res["skipped_files"]["train"] == 3  # still counted: once per file and epoch
