"""Fine-tuning and linear probing: end to end through the CLI on a small digits subset."""
import json

import pytest
import timm
import torch
from _util import randomize_

from sparse_fcmae.checkpoint import load_checkpoint, save_checkpoint
from sparse_fcmae.cli import compose, main
from sparse_fcmae.convert import sparse_to_timm
from sparse_fcmae.finetune import build_optimizer, train_step
from sparse_fcmae.models import SparseConvNeXtV2

SMALL = ["data.img_size=64", "data.batch_size=16", "data.max_images=48", "data.max_test_images=32", "optim.warmup_epochs=0"]


def _fcmae_checkpoint(path, in_chans=1):
    """A checkpoint in our pretraining format (encoder only, random weights), as `pretrain` writes it."""
    enc = randomize_(SparseConvNeXtV2("atto", in_chans=in_chans)).state_dict()
    save_checkpoint({"model": {"encoder." + k: v for k, v in enc.items()},
                     "config": {"model": {"name": "atto"}, "data": {"in_chans": in_chans}}}, path)
    return sparse_to_timm(enc, "atto")


def test_a_few_steps_with_layer_decay_lower_the_train_loss():
    cfg = compose("finetune", [])
    model = timm.create_model("convnextv2_atto", num_classes=10, in_chans=1)
    opt = build_optimizer(model, cfg, 1e-3)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert len(scales) > 3 and scales[-1] == 1.0 and scales[0] < 0.5  # layer-wise lr decay is on
    x, y = torch.randn(8, 1, 64, 64), torch.arange(8) % 10
    for g in opt.param_groups:
        g["lr"] = 1e-3 * g["lr_scale"]
    crit = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    losses = [train_step(model, x, y, opt, crit) for _ in range(8)]
    assert losses[-1] < losses[0]


def _top1_of_saved_model(run) -> float:
    """The reported top-1, recomputed: the saved weights in a fresh timm model, on the run's held-out split."""
    from omegaconf import OmegaConf

    from sparse_fcmae.finetune import build_splits

    state = load_checkpoint(run / "checkpoint-last.pth")
    cfg = OmegaConf.create(state["config"])
    _, test_set, n_cls, in_chans = build_splits(cfg)
    net = timm.create_model(state["arch"], pretrained=False, num_classes=n_cls, in_chans=in_chans)
    net.load_state_dict(state["model"])
    net.eval()
    hits = 0
    with torch.no_grad():
        for i in range(len(test_set)):
            x, y = test_set[i][0], test_set[i][1]
            hits += int(net(x.unsqueeze(0)).argmax(1).item() == int(y))
    return 100.0 * hits / len(test_set)


def test_finetune_cli_from_fcmae_checkpoint_end_to_end(tmp_path, capsys):
    ckpt = tmp_path / "fcmae.pth"
    _fcmae_checkpoint(ckpt)
    run = tmp_path / "ft"
    rc = main(["finetune", f"weights={ckpt}", f"run_dir={run}", "optim.epochs=2", "ema.enabled=true", *SMALL])
    assert rc == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "loaded sparse-fcmae weights" in out
    res = json.loads((run / "results.json").read_text())
    assert res["top1"] == pytest.approx(_top1_of_saved_model(run)) and "top1_ema" in res and len(res["history"]) == 2
    state = load_checkpoint(run / "checkpoint-last.pth")
    assert state["model"]["head.fc.weight"].shape == (10, 320) and "model_ema" in state


def test_linprobe_cli_freezes_the_encoder_and_trains_the_head(tmp_path, capsys):
    ckpt = tmp_path / "fcmae.pth"
    pre = _fcmae_checkpoint(ckpt)
    conv = tmp_path / "w.safetensors"
    assert main(["convert", str(ckpt), "-o", str(conv)]) == 0
    run = tmp_path / "lp"
    assert main(["linprobe", f"weights={conv}", f"run_dir={run}", "optim.epochs=3", *SMALL]) == 0
    res = json.loads((run / "results.json").read_text())
    assert res["top1"] == pytest.approx(_top1_of_saved_model(run))
    hist = [h["train_loss"] for h in res["history"]]
    assert hist[-1] < hist[0]
    model = load_checkpoint(run / "checkpoint-last.pth")["model"]
    for k, v in pre.items():  # encoder unchanged
        assert torch.equal(model[k], v), k
    assert torch.equal(model["head.norm.weight"], torch.ones(320))  # the parameter-free final norm stays frozen
    fresh = timm.create_model("convnextv2_atto", num_classes=10, in_chans=1)
    assert not torch.equal(model["head.fc.weight"], fresh.state_dict()["head.fc.weight"])


def test_size_mismatch_is_one_line_exit_2(tmp_path, capsys):
    ckpt = tmp_path / "fcmae.pth"
    _fcmae_checkpoint(ckpt)
    assert main(["finetune", f"weights={ckpt}", "model=tiny", f"run_dir={tmp_path / 'x'}", *SMALL]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "model=atto" in err
