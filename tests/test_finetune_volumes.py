"""``finetune`` / ``linprobe`` on volumes: ``model.spatial_dims=3 data=volumes`` trains ConvNeXtV2_3D with a head from
``convert --to dense3d`` weights or a 3D pretraining checkpoint; the loaded encoder equals the explicit mapping of
tests/test_volumes_convert.py; both weight sources train identically through the CLI."""
import json

import numpy as np
import pytest
import torch
from _pretrain_run import _one_thread  # noqa: F401  (an autouse fixture: one thread)
from omegaconf import OmegaConf
from safetensors.torch import load_file
from test_volumes_convert import _checkpoint, _timm_style_from_sparse

from sparse_fcmae.cli import main
from sparse_fcmae.config import compose
from sparse_fcmae.convert import convert_file
from sparse_fcmae.finetune.volumes import build_volume_classifier


def _labelled(root, n=3, seed=0):
    """Two classes of 32^3 .npy volumes: noise, with or without a bright cube."""
    rng = np.random.default_rng(seed)
    for c, bright in (("plain", 0.0), ("cube", 3.0)):
        (root / c).mkdir(parents=True)
        for i in range(n):
            a = rng.normal(size=(32, 32, 32)).astype(np.float32)
            a[8:24, 8:24, 8:24] += bright
            np.save(root / c / f"{i}.npy", a)
    return root


@pytest.mark.parametrize("kernel_size", [7, 3])
def test_both_weight_sources_load_the_explicit_mapping(tmp_path, kernel_size):
    ckpt, enc = _checkpoint(tmp_path, in_chans=1, kernel_size=kernel_size)
    dense = tmp_path / "w3d.safetensors"
    convert_file(ckpt, dense, target="dense3d", log=lambda *_: None)
    expected = _timm_style_from_sparse(enc, kernel_size)
    for weights in (ckpt, dense):
        cfg = compose("finetune", ["model.spatial_dims=3", "data=volumes", f"model.kernel_size={kernel_size}",
                                   f"weights={weights}"])
        got = build_volume_classifier(cfg, num_classes=4, in_chans=1).state_dict()
        assert got["head.fc.weight"].shape == (4, 320)
        for k, v in expected.items():
            assert torch.equal(got[k], v), (weights.name, k)
    assert set(load_file(str(dense))) - set(expected) == {"head.norm.weight", "head.norm.bias"}


def test_cli_finetunes_and_linprobes_volumes_from_either_source(tmp_path, capfd):
    ckpt, _ = _checkpoint(tmp_path, in_chans=1, kernel_size=7)
    dense = tmp_path / "w3d.safetensors"
    convert_file(ckpt, dense, target="dense3d", log=lambda *_: None)
    train, val = _labelled(tmp_path / "train"), _labelled(tmp_path / "val", n=2, seed=1)
    common = ["model.spatial_dims=3", "data=volumes", f"data.root={train}", f"data.val_root={val}", "data.img_size=32",
              "data.batch_size=2", "data.num_workers=0", "device=cpu", "optim.epochs=2", "optim.warmup_epochs=0",
              "data.clip_percentiles=[1,99]"]
    results = {}
    for name, weights in (("ckpt", ckpt), ("dense", dense)):
        capfd.readouterr()
        assert main(["finetune", *common, f"weights={weights}", f"run_dir={tmp_path / name}"]) == 0, capfd.readouterr().err
        out = capfd.readouterr().out
        assert "convnextv2_atto_3d on volumes (6 train / 4 test volumes, 32^3, 2 classes)" in out
        results[name] = json.loads((tmp_path / name / "results.json").read_text())
        saved = torch.load(tmp_path / name / "checkpoint-last.pth", weights_only=False)
        assert saved["arch"] == "convnextv2_atto_3d" and saved["model"]["head.fc.weight"].shape == (2, 320)
        assert saved["model"]["stem.0.weight"].shape == (40, 1, 4, 4, 4)
    assert results["ckpt"]["history"] == results["dense"]["history"]  # the same model, the same training
    assert all(np.isfinite(h["train_loss"]) for h in results["ckpt"]["history"])
    # a fine-tuned 3D checkpoint is weights too (its 2-way head kept); linear probing trains the head only
    capfd.readouterr()
    code = main(["linprobe", *common, f"weights={tmp_path / 'ckpt' / 'checkpoint-last.pth'}", f"run_dir={tmp_path / 'lp'}"])
    assert code == 0, capfd.readouterr().err
    probe = torch.load(tmp_path / "lp" / "checkpoint-last.pth", weights_only=False)["model"]
    tuned = torch.load(tmp_path / "ckpt" / "checkpoint-last.pth", weights_only=False)["model"]
    assert all(torch.equal(probe[k], tuned[k]) for k in tuned if not k.startswith("head.fc."))
    assert not torch.equal(probe["head.fc.weight"], tuned["head.fc.weight"])
    assert OmegaConf.create(torch.load(tmp_path / "lp" / "checkpoint-last.pth", weights_only=False)["config"]).mode == "linprobe"
