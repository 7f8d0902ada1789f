"""``convert --to hf``: a transformers ConvNextV2Model folder, checked against independent oracles
(the official FCMAE features, the sparse encoder itself, timm with timm's own loaders)."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import timm
import torch

transformers = pytest.importorskip("transformers")
from _util import FIXTURES, randomize_, rel_err  # noqa: E402
from transformers import ConvNextV2Model  # noqa: E402

from sparse_fcmae.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from sparse_fcmae.cli import main  # noqa: E402
from sparse_fcmae.convert import convert_items, sparse_to_timm, timm_shapes  # noqa: E402
from sparse_fcmae.convert.hf import hf_config  # noqa: E402
from sparse_fcmae.models import FCMAE  # noqa: E402
from sparse_fcmae.models.sizes import SIZES  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
OFFICIAL = FIXTURES / "official_fcmae_atto.pth"


def _convert(*args) -> int:
    return main(["convert", *map(str, args)])


def _offline(monkeypatch):
    import socket

    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _load(folder: pathlib.Path) -> ConvNextV2Model:
    model, info = ConvNextV2Model.from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _x(in_chans: int, px: int = 64) -> torch.Tensor:
    return torch.randn(2, in_chans, px, px, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("size", list(SIZES))
def test_key_table_gives_every_hf_key_and_shape(size):
    """The timm->HF table, applied to timm's full key set (shapes only), is exactly HF's state dict."""
    for in_chans in (3, 4):
        with torch.device("meta"):
            hf = ConvNextV2Model(hf_config(size, in_chans, torch.float32))
        want = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
        shapes = dict(timm_shapes(size, in_chans), **{"head.norm.weight": (SIZES[size][1][-1],),
                                                      "head.norm.bias": (SIZES[size][1][-1],),
                                                      "head.fc.weight": (5, SIZES[size][1][-1]), "head.fc.bias": (5,)})
        meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
        got = {k: tuple(v.shape) for k, v in convert_items(meta, "timm", "hf", size)}
        assert got == want


def test_official_fixture_through_cli_loads_offline_and_matches(tmp_path, monkeypatch):
    out = tmp_path / "hf_atto"
    r = subprocess.run([sys.executable, "-m", "sparse_fcmae.cli", "convert", str(OFFICIAL), "--to", "hf", "-o", str(out),
                        "--verify"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert "verify: max" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_atto"]  # no temp folder left behind
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "convnextv2" and cfg["depths"] == [2, 2, 6, 2] and cfg["hidden_sizes"] == [40, 80, 160, 320]

    _offline(monkeypatch)
    hf = _load(out)
    # FCMAE has no final norm: the pooler's layer norm is written as weight 1, bias 0
    assert torch.equal(hf.layernorm.weight, torch.ones(320)) and torch.equal(hf.layernorm.bias, torch.zeros(320))
    # oracle 1: the official repository's own features on the fixture's input
    feats = torch.load(FIXTURES / "official_atto_features.pt", weights_only=True)
    with torch.no_grad():
        assert rel_err(hf(pixel_values=feats["input"]).last_hidden_state, feats["features"]) < 1e-5
    # oracle 2: timm convnextv2_atto with the timm-converted weights, on a random input
    tm = timm.create_model("convnextv2_atto", pretrained=False, num_classes=0)
    missing, unexpected = tm.load_state_dict(sparse_to_timm(load_checkpoint(OFFICIAL)["model"], "atto"), strict=False)
    assert not unexpected and all(k.startswith("head.") for k in missing)
    x = _x(3, 96)
    with torch.no_grad():
        o = hf(pixel_values=x)
        f = tm.eval().forward_features(x)
        assert rel_err(o.last_hidden_state, f) < 1e-5
        assert o.pooler_output.shape == (2, 320)
        assert rel_err(o.pooler_output, tm.forward_head(f, pre_logits=True)) < 1e-5


def test_four_channel_own_checkpoint(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    fcmae = randomize_(FCMAE("atto", in_chans=4))
    ckpt = tmp_path / "checkpoint-last.pth"
    save_checkpoint({"model": fcmae.state_dict(), "config": {"model": {"name": "atto"}, "data": {"in_chans": 4}}}, ckpt)
    out = tmp_path / "nested" / "hf4"
    assert _convert(ckpt, "--to", "hf", "-o", out, "--verify") == 0, capsys.readouterr().err
    log = capsys.readouterr().out
    assert "sparse-fcmae, convnextv2_atto, in_chans 4" in log and "verify: max" in log
    _offline(monkeypatch)
    hf = _load(out)
    assert hf.config.num_channels == 4
    x = _x(4)
    with torch.no_grad():  # oracle: the sparse encoder itself (mask ratio 0), no weight mapping involved
        assert rel_err(hf(pixel_values=x).last_hidden_state, fcmae.encoder.eval().forward_features(x)) < 1e-5


def test_timm_classifier_and_official_dense_sources(tmp_path, monkeypatch, capsys):
    # timm tiny (Linear MLP), with a trained head norm (-> HF's pooler norm) and a classifier (dropped)
    torch.manual_seed(0)
    tm = randomize_(timm.create_model("convnextv2_tiny", pretrained=False, num_classes=5)).eval()
    src = tmp_path / "tiny.safetensors"
    from safetensors.torch import save_file

    save_file(tm.state_dict(), str(src))
    assert _convert(src, "--to", "hf", "-o", tmp_path / "hf_tiny", "--verify") == 0, capsys.readouterr().err
    # official dense layout (from the official fixture)
    dense = tmp_path / "dense.pth"
    assert _convert(OFFICIAL, "--to", "official", "-o", dense) == 0
    assert _convert(dense, "--to", "hf", "-o", tmp_path / "hf_dense", "--verify") == 0, capsys.readouterr().err
    _offline(monkeypatch)
    x = _x(3)
    with torch.no_grad():
        o = _load(tmp_path / "hf_tiny")(pixel_values=x)
        f = tm.forward_features(x)
        assert rel_err(o.last_hidden_state, f) < 1e-5
        assert rel_err(o.pooler_output, tm.forward_head(f, pre_logits=True)) < 1e-5
        feats = torch.load(FIXTURES / "official_atto_features.pt", weights_only=True)
        assert rel_err(_load(tmp_path / "hf_dense")(pixel_values=feats["input"]).last_hidden_state, feats["features"]) < 1e-5


def test_corrupted_tensor_fails_verification_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import sparse_fcmae.convert.hf as cc

    real = cc.verify_hf
    seen = []

    def corrupting(src, folder, *a, **k):  # change one written weight, then verify it for real
        from safetensors.torch import load_file, save_file

        path = str(pathlib.Path(folder) / "model.safetensors")
        state = load_file(path)
        state["encoder.stages.2.layers.3.pwconv1.weight"][0, 0] += 1.0
        save_file(state, path, metadata={"format": "pt"})
        seen.append(real(src, folder, *a, **k))
        return seen[-1]

    monkeypatch.setattr(cc, "verify_hf", corrupting)
    assert _convert(OFFICIAL, "--to", "hf", "-o", tmp_path / "hf", "--verify") == 1
    assert seen and seen[0] >= 1e-5  # the real check caught the corrupted weight
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "verification failed" in err
    assert not any(tmp_path.iterdir())


def test_bad_outputs_and_targets_exit_2_with_one_line_and_no_output(tmp_path, capsys):
    afile = tmp_path / "taken"
    afile.write_text("keep me\n")
    full = tmp_path / "full"
    full.mkdir()
    (full / "other.txt").write_text("mine\n")
    cases = {
        "output is a file": ["--to", "hf", "-o", afile],
        "output is a non-empty folder": ["--to", "hf", "-o", full],
        "unknown target": ["--to", "onnx", "-o", tmp_path / "new"],
    }
    before = sorted(p.name for p in tmp_path.iterdir())
    for what, args in cases.items():
        assert _convert(OFFICIAL, *args) == 2, what
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), (what, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, what
    assert afile.read_text() == "keep me\n" and [p.name for p in full.iterdir()] == ["other.txt"]
    # an empty existing folder is filled
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _convert(OFFICIAL, "--to", "hf", "-o", empty) == 0
    assert sorted(p.name for p in empty.iterdir()) == ["config.json", "model.safetensors"]


def test_bad_inputs_to_hf_exit_2_and_write_nothing(tmp_path, capsys):
    from test_convert import _bad_inputs

    cases = _bad_inputs(tmp_path)
    capsys.readouterr()
    for what, (src, extra) in cases.items():
        out_dir = tmp_path / what.replace(" ", "_")
        out_dir.mkdir()
        assert _convert(src, "--to", "hf", "-o", out_dir / "hf", *extra) == 2, what
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), (what, err)
        assert not any(out_dir.iterdir()), what


@pytest.mark.parametrize("size", ["atto", "tiny"])  # conv-MLP and Linear-MLP sizes
def test_hf_keys_map_back_to_timm_exactly(size):
    """The rule table read backwards: every HF key and shape returns to timm's own, bit for bit."""
    torch.manual_seed(0)
    timm_state = {k: torch.randn(s) for k, s in timm_shapes(size).items()}
    hf = dict(convert_items(timm_state, "timm", "hf", size))
    back = dict(convert_items(hf, "hf", "timm", size))
    assert back.keys() == timm_state.keys()
    assert all(torch.equal(back[k], v) for k, v in timm_state.items())


def test_hf_folder_reads_back(tmp_path, monkeypatch, capsys):
    """A folder `--to hf` wrote is a source too: converted to timm it equals the direct conversion (bit-exact),
    `--verify` passes against the sparse model built from it, and fine-tuning loads it by folder name."""
    _offline(monkeypatch)
    assert _convert(OFFICIAL, "--to", "hf", "-o", tmp_path / "hf") == 0
    assert _convert(OFFICIAL, "--to", "timm", "-o", tmp_path / "direct.safetensors") == 0
    assert _convert(tmp_path / "hf", "--to", "timm", "-o", tmp_path / "back.safetensors", "--verify") == 0
    assert "(hf, convnextv2_atto" in capsys.readouterr().out
    from safetensors.torch import load_file

    direct, back = load_file(str(tmp_path / "direct.safetensors")), load_file(str(tmp_path / "back.safetensors"))
    assert direct.keys() == back.keys() and all(torch.equal(direct[k], back[k]) for k in direct)
    from sparse_fcmae.finetune import load_timm_weights

    state, size, in_chans, fmt = load_timm_weights(str(tmp_path / "hf"))
    assert (size, in_chans, fmt) == ("atto", 3, "hf") and all(torch.equal(state[k], direct[k]) for k in state)
