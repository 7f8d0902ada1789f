"""Which weights `finetune weights=<checkpoint>` starts from: the same rule as `convert`."""
import timm
import torch
from _util import randomize_

from sparse_fcmae.checkpoint import save_checkpoint
from sparse_fcmae.cli import compose, main
from sparse_fcmae.finetune import build_classifier


def _finetuned_checkpoint(path):
    """A checkpoint as `finetune ema.enabled=true` writes it: trained "model" (10-way head) and a different "model_ema"."""
    model = randomize_(timm.create_model("convnextv2_atto", num_classes=10, in_chans=1)).state_dict()
    ema = {k: v + 1.0 if v.is_floating_point() else v for k, v in model.items()}
    save_checkpoint({"model": model, "model_ema": ema, "epoch": 4, "arch": "convnextv2_atto",
                     "config": {"mode": "finetune", "model": {"name": "atto"}}}, path)
    return model


def test_finetune_and_convert_both_start_from_model_not_model_ema_with_the_head(tmp_path):
    ckpt = tmp_path / "checkpoint-last.pth"
    trained = _finetuned_checkpoint(ckpt)
    net = build_classifier(compose("finetune", [f"weights={ckpt}"]), num_classes=10, in_chans=1)
    got = net.state_dict()
    assert got.keys() == trained.keys()
    for k, v in trained.items():
        assert torch.equal(got[k], v), k  # every weight, the 10-way head included, from "model"
    out = tmp_path / "w.safetensors"
    assert main(["convert", str(ckpt), "-o", str(out)]) == 0
    from safetensors.torch import load_file

    converted = load_file(str(out))
    for k, v in converted.items():
        assert torch.equal(got[k], v), k  # convert reads the same weights


def test_a_head_for_another_class_count_is_replaced(tmp_path):
    ckpt = tmp_path / "checkpoint-last.pth"
    trained = _finetuned_checkpoint(ckpt)
    net = build_classifier(compose("finetune", [f"weights={ckpt}"]), num_classes=3, in_chans=1)
    got = net.state_dict()
    assert got["head.fc.weight"].shape == (3, 320)
    assert torch.equal(got["stages.3.blocks.1.mlp.fc2.weight"], trained["stages.3.blocks.1.mlp.fc2.weight"])
