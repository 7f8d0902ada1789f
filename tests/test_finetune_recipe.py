"""The official fine-tuning recipe through timm: RandAugment, random erasing, Mixup/CutMix, the evaluation crop,
and the per-size presets (conf/recipe/), each against timm's own implementation or the official numbers."""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from test_finetune_imagefolder import _photo_folders

from sparse_fcmae.cli import main
from sparse_fcmae.config import compose
from sparse_fcmae.data import TimmRandAugment, _fcmae_transform

POLICY = "rand-m9-mstd0.5-inc1"


def _photo(px=96) -> Image.Image:
    from sklearn.datasets import load_sample_images

    return Image.fromarray(load_sample_images().images[0][100:100 + px, 200:200 + px])


def _tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)


def test_rand_augment_is_timms_own_on_the_tensor():
    """Our tensor wrapper gives exactly what timm's RandAugment gives on the PIL image (same draws)."""
    from timm.data.auto_augment import RandAugment, rand_augment_transform

    img = _photo()
    ours = TimmRandAugment(POLICY, 96, 3, (0.485, 0.456, 0.406))
    assert isinstance(ours.op, RandAugment) and ours.op.num_layers == 2
    theirs = rand_augment_transform(POLICY, {"translate_const": int(96 * 0.45), "img_mean": (124, 116, 104)})
    changed = 0
    for seed in range(6):
        random.seed(seed)
        np.random.seed(seed)
        got = ours(_tensor(img))
        random.seed(seed)
        np.random.seed(seed)
        assert torch.equal(got, _tensor(theirs(img))), seed
        changed += not torch.equal(got, _tensor(img))
    assert changed >= 3  # the ops really ran


def test_random_erasing_changes_one_rectangle_of_the_normalised_image():
    """reprob=1: the same crop and flip (same seed) as without erasing, except one rectangle (timm, per-pixel)."""
    x = _tensor(_photo())
    torch.manual_seed(0)
    plain = _fcmae_transform(64, 3, True)(x)
    torch.manual_seed(0)
    erased = _fcmae_transform(64, 3, True, reprob=1.0)(x)
    diff = (plain != erased).any(0)
    rows, cols = diff.any(1).nonzero(), diff.any(0).nonzero()
    box = diff[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert diff.sum() > 0 and box.float().mean() > 0.99  # a filled rectangle, nothing outside it


def test_evaluation_crop_pct_matches_timms_eval_transform():
    """crop_pct 0.875: resize to img_size / 0.875, centre crop, as timm's create_transform (PIL bicubic: close,
    not bit-equal); a crop of the whole image (crop_pct ignored) differs far more."""
    from timm.data import create_transform

    img = _photo(120)
    want = create_transform(64, is_training=False, crop_pct=0.875, interpolation="bicubic")(img)
    got = _fcmae_transform(64, 3, False, crop_pct=0.875)(_tensor(img))
    whole = _fcmae_transform(64, 3, False, crop_pct=1.0)(_tensor(img))
    err, wrong = (got - want).abs().mean().item(), (whole - want).abs().mean().item()
    assert err < 0.05 and wrong > 4 * err, (err, wrong)


def _finetune(tmp_path, *extra):
    train, val = _photo_folders(tmp_path / "photos")
    return main(["finetune", "data=imagefolder", f"data.root={train}", f"data.val_root={val}", "data.img_size=64",
                 "data.batch_size=4", "data.num_workers=0", "optim.epochs=1", f"run_dir={tmp_path / 'run'}", *extra])


def test_mixup_and_cutmix_train_on_soft_targets(tmp_path, capfd):
    """Through the CLI: the official augmentations run end to end; with Mixup/CutMix the loss is timm's soft-target
    loss on mixed batches (a different loss from the same seed without them)."""
    import json

    on = ["aug.mixup=0.8", "aug.cutmix=1.0", f"aug.rand_augment={POLICY}", "aug.reprob=0.25", "aug.crop_pct=0.875"]
    assert _finetune(tmp_path / "a", *on) == 0
    assert _finetune(tmp_path / "b", f"aug.rand_augment={POLICY}", "aug.reprob=0.25", "aug.crop_pct=0.875") == 0
    a, b = (json.loads((tmp_path / x / "run" / "results.json").read_text()) for x in "ab")
    assert np.isfinite(a["history"][0]["train_loss"]) and a["history"][0]["train_loss"] != b["history"][0]["train_loss"]
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    from sparse_fcmae.finetune import build_mixup

    mix, loss = build_mixup(compose("finetune", ["aug.mixup=0.8", "aug.cutmix=1.0"]), 10)
    assert isinstance(mix, Mixup) and isinstance(loss, SoftTargetCrossEntropy)
    x, y = mix(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert y.shape == (4, 10) and torch.allclose(y.sum(1), torch.ones(4))  # soft targets, smoothing folded in


@pytest.mark.parametrize("args,needle", [
    (["aug.mixup=0.8", "data.batch_size=3"], "must be even"),
    (["aug.rand_augment=" + POLICY], "image folders"),  # digits: no PIL images to augment
    (["aug.rand_augment=auto"], "RandAugment policy"),
    (["aug.crop_pct=0"], "crop_pct"),
])
def test_bad_augmentation_settings_are_one_line(args, needle, tmp_path, capfd):
    assert main(["finetune", f"run_dir={tmp_path / 'r'}", *args]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
    assert main(["linprobe", f"run_dir={tmp_path / 'l'}", "aug.mixup=0.8"]) == 2
    assert "linprobe" in capfd.readouterr().err


@pytest.mark.parametrize("size,blr,epochs,wd,dp,smoothing,mixup,ld", [
    # facebookresearch/ConvNeXt-V2 TRAINING.md, ImageNet-1k fine-tuning
    ("atto", 2e-4, 600, 0.3, 0.1, 0.2, 0.0, 0.9), ("tiny", 8e-4, 300, 0.05, 0.2, 0.1, 0.8, 0.9),
    ("base", 6.25e-4, 100, 0.05, 0.1, 0.1, 0.8, 0.6),
])
def test_official_recipes(size, blr, epochs, wd, dp, smoothing, mixup, ld):
    c = compose("finetune", [f"recipe=official_{size}", "data=imagefolder", "data.root=/x"])
    assert (c.model.name, c.optim.blr, c.optim.epochs, c.optim.weight_decay, c.drop_path_rate) == (size, blr, epochs, wd, dp)
    assert (c.optim.label_smoothing, c.aug.mixup, c.optim.layer_decay, c.aug.reprob) == (smoothing, mixup, ld, 0.25)
    assert c.aug.rand_augment == POLICY and c.ema.enabled and c.aug.crop_pct == 0.875 and c.data.img_size == 224
