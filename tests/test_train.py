"""Training behaviour: any channel count trains, the loss falls on the digits, the CLI writes its outputs."""
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from sparse_fcmae.data import DigitsDataset
from sparse_fcmae.models import FCMAE
from sparse_fcmae.training import param_groups

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("in_chans", [1, 4])
def test_any_channel_count_trains(in_chans):
    model = FCMAE("atto", in_chans=in_chans, decoder_dim=64)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=2e-3)
    # smooth images: each patch is predictable from its neighbours
    imgs = torch.nn.functional.interpolate(torch.randn(4, in_chans, 3, 3), size=(64, 64), mode="bilinear")
    mask = model.random_masking(imgs, torch.Generator().manual_seed(0))
    losses = []
    for _ in range(15):  # fixed batch and mask: the loss must go down
        loss, pred, _ = model(imgs, mask)
        assert pred.shape == (4, 32 * 32 * in_chans, 2, 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_no_weight_decay_on_bias_norm_grn_and_mask_token():
    model = FCMAE("atto", in_chans=1, decoder_dim=32)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "mask_token" in no_decay_names
    assert "encoder.stages.0.0.grn.gamma" in no_decay_names and "decoder.0.grn.beta" in no_decay_names
    assert "encoder.stages.0.0.norm.ln.weight" in no_decay_names
    assert "encoder.stages.0.0.dwconv.kernel" in decay_names and "pred.weight" in decay_names
    assert not decay_names & no_decay_names


def test_thirty_steps_on_digits_decrease_the_loss():
    torch.manual_seed(0)
    data = DigitsDataset(img_size=64, split="train")
    model = FCMAE("atto", in_chans=1, decoder_dim=64, mask_ratio=0.5)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        idx = torch.randint(0, len(data), (16,), generator=gen)
        imgs = data.images[idx]
        loss, _, _ = model(imgs, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)


def _cli(*args, cwd):
    env = dict(os.environ, WANDB_MODE="disabled")
    return subprocess.run([sys.executable, "-m", "sparse_fcmae.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_cli_pretrain_writes_checkpoint_config_and_panel(tmp_path):
    run = tmp_path / "run"
    r = _cli("pretrain", f"run_dir={run}", "data.img_size=64", "data.batch_size=16", "data.max_images=64",
             "optim.epochs=2", "model.decoder_dim=64", "panels=4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run / "config.yaml").is_file()
    ckpt = torch.load(run / "checkpoint-last.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and len(ckpt["losses"]) == 2
    assert any(k.startswith("encoder.stages.0.0.dwconv.kernel") for k in ckpt["model"])
    from PIL import Image

    with Image.open(run / "reconstruction.png") as im:
        assert im.size[0] > 3 * 64 and im.size[1] > 4 * 64  # 3 columns, 4 rows
    assert not list(run.glob(".*.tmp"))  # no temp files left by the atomic writes


def test_cli_pretrain_compiled_matches_eager(tmp_path):
    """compile=true (the whole model under torch.compile, the sparse encoder on its graph path) trains to the same
    weights as eager."""
    common = ["data.img_size=64", "data.batch_size=8", "data.max_images=16", "optim.epochs=1", "model.decoder_dim=32",
              "panels=0"]
    states = {}
    for compiled in ("false", "true"):
        run = tmp_path / f"run-{compiled}"
        r = _cli("pretrain", f"run_dir={run}", f"compile={compiled}", *common, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        states[compiled] = torch.load(run / "checkpoint-last.pth", weights_only=True)["model"]
        said = r.stdout + r.stderr
        assert ("torch.compile: the model (sparse encoder: graph path)" in said) == (compiled == "true")
    for k, v in states["false"].items():
        if v.is_floating_point():
            assert torch.allclose(states["true"][k], v, rtol=1e-4, atol=1e-6), k


def test_cli_pretrain_graph_path_trains_bitwise_like_minkowskiengine(tmp_path):
    """graph=true (the sparse encoder's graph path, eagerly) trains to bitwise the weights of the MinkowskiEngine
    path on CPU: the same tables, the same ops, in the same order."""
    common = ["data.img_size=64", "data.batch_size=8", "data.max_images=16", "optim.epochs=1", "model.decoder_dim=32",
              "panels=0"]
    states = {}
    for graph in ("false", "true"):
        run = tmp_path / f"run-{graph}"
        r = _cli("pretrain", f"run_dir={run}", f"graph={graph}", *common, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        states[graph] = torch.load(run / "checkpoint-last.pth", weights_only=True)["model"]
        assert ("sparse encoder: graph path" in r.stdout + r.stderr) == (graph == "true")
    for k, v in states["false"].items():
        assert torch.equal(states["true"][k], v), k


def test_cli_pretrain_fp16_scales_the_loss_and_resumes_the_scale(tmp_path):
    """precision=fp16: every optimizer step goes through the GradScaler (its growth tracker counts them),
    and a resumed run continues the checkpoint's scaler state rather than starting a new one."""
    run = tmp_path / "run"
    common = [f"run_dir={run}", "precision=fp16", "data.img_size=64", "data.batch_size=16", "data.max_images=64",
              "model.decoder_dim=32", "panels=0"]
    r = _cli("pretrain", "optim.epochs=1", *common, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    first = torch.load(run / "checkpoint-last.pth", weights_only=True)["scaler"]
    assert first["scale"] == 65536.0 and first["_growth_tracker"] == 4  # 64 images / 16 = 4 steps, none skipped
    r = _cli("pretrain", "optim.epochs=2", *common, cwd=tmp_path)  # resumes epoch 2
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = torch.load(run / "checkpoint-last.pth", weights_only=True)
    assert ckpt["scaler"]["_growth_tracker"] == 8 and all(math.isfinite(x) for x in ckpt["losses"])


@pytest.mark.parametrize("override,needle", [("mask_ratio=1.0", "mask_ratio"), ("data.img_size=100", "divisible by 32"),
                                             ("model=nosuch", "model")])
def test_cli_bad_config_is_one_clear_line(tmp_path, override, needle):
    r = _cli("pretrain", override, f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr
    assert not (tmp_path / "run" / "checkpoint-last.pth").exists()
