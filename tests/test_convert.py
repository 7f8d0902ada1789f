"""Weight conversion: exact round trips, timm's own loader and filter as oracles, the CLI's errors."""
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import timm
import torch
from _util import FIXTURES, randomize_, rel_err
from timm.models.convnext import checkpoint_filter_fn

from sparse_fcmae.checkpoint import load_checkpoint
from sparse_fcmae.cli import main
from sparse_fcmae.convert import (
    convert_state,
    dense_to_timm,
    encoder_state,
    sparse_to_timm,
    timm_shapes,
    timm_to_dense,
    timm_to_sparse,
)
from sparse_fcmae.models import SparseConvNeXtV2

ROOT = pathlib.Path(__file__).resolve().parents[1]
OFFICIAL = FIXTURES / "official_fcmae_atto.pth"


def _official():
    return encoder_state(load_checkpoint(OFFICIAL)["model"])


def _random_encoder(size: str, in_chans: int) -> dict[str, torch.Tensor]:
    return randomize_(SparseConvNeXtV2(size, in_chans=in_chans)).state_dict()


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("size", ["atto", "tiny"])  # conv MLP (atto) and Linear MLP (tiny) in timm
def test_timm_shapes_table_matches_timm(size):
    model = timm.create_model(f"convnextv2_{size}", pretrained=False, num_classes=0, in_chans=4)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("head.")}
    assert timm_shapes(size, in_chans=4) == want


@pytest.mark.parametrize("size,in_chans", [("atto", 3), ("tiny", 4)])
def test_round_trips_are_exact(size, in_chans):
    sparse = _official() if size == "atto" else _random_encoder(size, in_chans)
    _same(timm_to_sparse(sparse_to_timm(sparse, size), size), sparse)
    _same(convert_state(convert_state(sparse, "sparse", "dense", size), "dense", "sparse", size), sparse)
    t = sparse_to_timm(sparse, size)
    _same(dense_to_timm(timm_to_dense(t, size), size), t)


@pytest.mark.parametrize("size", ["atto", "tiny"])
def test_official_dense_layout_agrees_with_timms_own_filter(size):
    """timm's checkpoint_filter_fn (official dense -> timm) is an independent oracle for our dense layout."""
    sparse = _official() if size == "atto" else _random_encoder(size, 3)
    dense = convert_state(sparse, "sparse", "dense", size)
    assert dense["stages.0.0.grn.gamma"].shape == (1, 1, 1, 4 * (40 if size == "atto" else 96))
    assert "stages.0.0.dwconv.weight" in dense and "downsample_layers.1.1.weight" in dense
    model = timm.create_model(f"convnextv2_{size}", pretrained=False, num_classes=0)
    _same(checkpoint_filter_fn(dict(dense), model), sparse_to_timm(sparse, size))


def _convert(*args) -> int:
    return main(["convert", *map(str, args)])


def _no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name", ["atto.safetensors", "atto.pth"])
def test_official_fixture_to_timm_through_cli_reproduces_features(tmp_path, monkeypatch, name):
    out = tmp_path / name
    if name.endswith(".safetensors"):  # once as a real process, as a user runs it
        r = subprocess.run([sys.executable, "-m", "sparse_fcmae.cli", "convert", str(OFFICIAL), "-o", str(out)],
                           capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 0, r.stderr
    else:
        assert _convert(OFFICIAL, "-o", out) == 0
    if name.endswith(".safetensors"):
        from safetensors.torch import load_file

        assert "stem.0.weight" in load_file(str(out))
    else:
        assert out.read_bytes()[:2] == b"PK"  # torch.save's zip format
    _no_network(monkeypatch)
    model = timm.create_model("convnextv2_atto", pretrained=True, pretrained_cfg_overlay=dict(file=str(out)), num_classes=7)
    assert model.head.fc.out_features == 7
    feats = torch.load(FIXTURES / "official_atto_features.pt", weights_only=True)
    with torch.no_grad():
        assert rel_err(model.eval().forward_features(feats["input"]), feats["features"]) < 1e-5


def test_every_target_verifies_and_dense_round_trip_is_exact(tmp_path, capsys):
    assert _convert(OFFICIAL, "-o", tmp_path / "official.pth", "--to", "official", "--verify") == 0
    assert _convert(tmp_path / "official.pth", "-o", tmp_path / "sparse.pth", "--to", "sparse-fcmae", "--verify") == 0
    assert _convert(tmp_path / "sparse.pth", "-o", tmp_path / "t.safetensors", "--arch", "convnextv2_atto", "--verify") == 0
    assert capsys.readouterr().out.count("verify: max") == 3
    back = load_checkpoint(tmp_path / "sparse.pth")
    assert back["config"]["model"]["name"] == "atto"
    _same(encoder_state(back["model"]), _official())  # official FCMAE -> official dense -> sparse: exact


def test_own_pretraining_checkpoint_converts_and_verifies(tmp_path, capsys):
    from sparse_fcmae.cli import compose
    from sparse_fcmae.training import pretrain

    run = tmp_path / "run"
    cfg = compose("pretrain", [f"run_dir={run}", "optim.epochs=1", "data.img_size=64", "data.batch_size=16",
                               "data.max_images=32", "model.decoder_dim=32", "panels=2"])
    ckpt = pretrain(cfg)["checkpoint"]
    out = tmp_path / "digits.safetensors"
    assert _convert(ckpt, "-o", out, "--verify") == 0
    log = capsys.readouterr().out
    assert "sparse-fcmae, convnextv2_atto, in_chans 1" in log and "verify: max" in log
    model = timm.create_model("convnextv2_atto", pretrained=True, pretrained_cfg_overlay=dict(file=str(out)),
                              num_classes=10, in_chans=1)
    trained = sparse_to_timm(load_checkpoint(ckpt)["model"], "atto")
    _same({k: v for k, v in model.state_dict().items() if k in trained}, trained)


def _bad_inputs(tmp: pathlib.Path) -> dict[str, tuple[pathlib.Path, list[str]]]:
    raw = OFFICIAL.read_bytes()
    (tmp / "truncated.pth").write_bytes(raw[: len(raw) // 2])
    (tmp / "foreign.txt").write_text("not a checkpoint\n")
    torch.save({"model": {"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}}, tmp / "resnet.pth")
    ckpt = load_checkpoint(OFFICIAL)
    del ckpt["model"]["encoder.stages.2.3.pwconv1.linear.weight"]
    torch.save(ckpt, tmp / "missing.pth")
    good = tmp / "good.safetensors"
    assert _convert(OFFICIAL, "-o", good) == 0
    (tmp / "truncated.safetensors").write_bytes(good.read_bytes()[:-1000])
    return {
        "truncated torch file": (tmp / "truncated.pth", []),
        "truncated safetensors": (tmp / "truncated.safetensors", []),
        "foreign text file": (tmp / "foreign.txt", []),
        "foreign state dict": (tmp / "resnet.pth", []),
        "missing key": (tmp / "missing.pth", []),
        "wrong --arch": (OFFICIAL, ["--arch", "convnextv2_tiny"]),
        "unknown --arch": (OFFICIAL, ["--arch", "resnet50"]),
        "wrong --from": (OFFICIAL, ["--from", "official-dense"]),
        "no such file": (tmp / "nope.pth", []),
    }


def test_bad_inputs_exit_2_with_one_line_and_no_output(tmp_path, capsys):
    cases = _bad_inputs(tmp_path)
    capsys.readouterr()
    for what, (src, extra) in cases.items():
        out_dir = tmp_path / what.replace(" ", "_")
        out_dir.mkdir()
        for out in (out_dir / "w.safetensors", out_dir / "w.pth"):
            assert _convert(src, "-o", out, *extra) == 2, what
            err = capsys.readouterr().err
            assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), (what, err)
            assert not any(out_dir.iterdir()), what  # no output, no temp file left behind


def test_failed_verification_exits_nonzero_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import sparse_fcmae.convert.verify as cc

    real = cc.verify_conversion
    seen = []

    def corrupting(src, out, *a, **k):  # flip one weight in the written file, then verify it for real
        from safetensors.torch import load_file, save_file

        state = load_file(str(out))
        state["stages.2.blocks.3.mlp.fc1.weight"][0, 0] += 1.0
        save_file(state, str(out))
        seen.append(real(src, out, *a, **k))
        return seen[-1]

    monkeypatch.setattr(cc, "verify_conversion", corrupting)
    out = tmp_path / "w.safetensors"
    assert _convert(OFFICIAL, "-o", out, "--verify") == 1
    assert seen and seen[0] >= 1e-5  # the real check caught the corrupted weight
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "verification failed" in err
    assert not any(tmp_path.iterdir())


def test_pretraining_can_start_from_converted_official_weights(tmp_path):
    """The official fixture, converted to the official dense layout, seeds a pretraining run's encoder."""
    from omegaconf import OmegaConf

    from sparse_fcmae.checkpoint import load_checkpoint
    from sparse_fcmae.convert import convert_file
    from sparse_fcmae.training import build_model, load_init_weights

    dense = tmp_path / "official_dense.pth"
    convert_file(FIXTURES / "official_fcmae_atto.pth", dense, target="official", log=lambda *a: None)
    cfg = OmegaConf.create({"model": {"name": "atto", "decoder_depth": 1, "decoder_dim": 64, "drop_path_rate": 0.0,
                                      "encoder": "sparse"}, "data": {"in_chans": 3}, "mask_ratio": 0.6,
                            "norm_pix_loss": True})
    model = build_model(cfg)
    summary = load_init_weights(model, str(dense), "atto", 3)
    assert "official-dense" in summary
    official = load_checkpoint(FIXTURES / "official_fcmae_atto.pth")["model"]
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, official["encoder." + k]), k
    with pytest.raises(ValueError, match="convnextv2_atto"):
        load_init_weights(build_model(OmegaConf.merge(cfg, {"model": {"name": "femto"}})), str(dense), "femto", 3)


@pytest.mark.parametrize("target", ["official", "sparse-fcmae"])
def test_verify_accepts_a_classifier_and_really_compares(tmp_path, capsys, monkeypatch, target):
    # a timm classifier (5 classes): verification covers the encoder, the head is not part of it
    src = tmp_path / "cls.pth"
    torch.save(randomize_(timm.create_model("convnextv2_atto", pretrained=False, num_classes=5)).state_dict(), src)
    out = tmp_path / "out" / "w.pth"
    out.parent.mkdir()
    assert _convert(src, "-o", out, "--to", target, "--verify") == 0, capsys.readouterr().err
    err = float(capsys.readouterr().out.split("max |dense| = ")[1].split()[0])
    assert err < 1e-5 and out.is_file()
    out.unlink()

    import sparse_fcmae.convert.verify as cc

    real = cc.verify_conversion
    seen = []

    def corrupting(src, written, *a, **k):  # change one converted weight, then verify it for real
        obj = torch.load(written, weights_only=True)
        key = next(k for k in obj["model"] if "stages.2.3.pwconv1" in k and k.endswith("weight"))
        obj["model"][key][0, 0] += 1.0
        torch.save(obj, written)
        seen.append(real(src, written, *a, **k))
        return seen[-1]

    monkeypatch.setattr(cc, "verify_conversion", corrupting)
    assert _convert(src, "-o", out, "--to", target, "--verify") == 1
    assert seen and seen[0] >= 1e-5
    assert not any(out.parent.iterdir())
