"""``convert --to dense3d``: a 3D FCMAE checkpoint -> the dense 3D ConvNeXt V2 (timm-style keys), checked
against the explicit-loop mapping of test_volumes.py, by --verify (mask ratio 0) and by a bit-exact round trip."""
import pytest
import torch
from _util import randomize_
from safetensors.torch import load_file
from test_volumes import _timm_style_from_sparse

from sparse_fcmae.convert import ConversionError, convert_file
from sparse_fcmae.convert.dense3d import dense3d_to_sparse, sparse_to_dense3d
from sparse_fcmae.models import FCMAE
from sparse_fcmae.models.convnext3d import ConvNeXtV2_3D


def _checkpoint(tmp_path, in_chans=2, kernel_size=3, spatial_dims=3):
    model = randomize_(FCMAE("atto", in_chans=in_chans, decoder_dim=16, kernel_size=kernel_size, spatial_dims=spatial_dims))
    path = tmp_path / "checkpoint-last.pth"
    cfg = {"model": {"name": "atto", "kernel_size": kernel_size, "spatial_dims": spatial_dims}, "data": {"in_chans": in_chans}}
    torch.save({"model": model.state_dict(), "config": cfg, "epoch": 0}, path)
    return path, {k.removeprefix("encoder."): v for k, v in model.state_dict().items() if k.startswith("encoder.")}


@pytest.mark.parametrize("in_chans,kernel_size", [(2, 3), (1, 7)])
def test_dense3d_conversion_matches_the_explicit_mapping_and_verifies(tmp_path, in_chans, kernel_size):
    src, enc = _checkpoint(tmp_path, in_chans, kernel_size)
    out = tmp_path / "dense3d.safetensors"
    logs = []
    info = convert_file(src, out, target="dense3d", verify=True, log=logs.append)
    assert info["verify_rel_err"] < 1e-5 and info["kernel_size"] == kernel_size and info["in_chans"] == in_chans
    got = load_file(str(out))
    expected = _timm_style_from_sparse(enc, kernel_size)
    assert set(got) == set(expected) | {"head.norm.weight", "head.norm.bias"}
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
    model = ConvNeXtV2_3D("atto", in_chans=in_chans, kernel_size=kernel_size, num_classes=3)
    missing, unexpected = model.load_state_dict(got, strict=False)
    assert not unexpected and missing == ["head.fc.weight", "head.fc.bias"]  # a fresh classifier for fine-tuning
    assert model(torch.randn(1, in_chans, 32, 32, 32)).shape == (1, 3)


def test_round_trip_is_bit_exact(tmp_path):
    _, enc = _checkpoint(tmp_path, 2, 5)
    dense = sparse_to_dense3d(enc)
    back = dense3d_to_sparse(dense)
    assert set(back) == set(enc)
    for k, v in enc.items():
        assert back[k].shape == v.shape and torch.equal(back[k], v), k
    again = sparse_to_dense3d(back)
    assert all(torch.equal(again[k], v) for k, v in dense.items())


def test_volume_and_image_checkpoints_are_told_apart(tmp_path):
    (tmp_path / "a").mkdir()
    src3d, _ = _checkpoint(tmp_path / "a", 1, 3)
    with pytest.raises(ConversionError, match=r"3D \(volume\) checkpoint: convert it with --to dense3d"):
        convert_file(src3d, tmp_path / "w.safetensors", target="timm", log=lambda *_: None)
    with pytest.raises(ConversionError, match="writes safetensors"):
        convert_file(src3d, tmp_path / "w.pth", target="dense3d", log=lambda *_: None)
    (tmp_path / "b").mkdir()
    src2d, _ = _checkpoint(tmp_path / "b", 1, 7, spatial_dims=2)
    with pytest.raises(ConversionError, match="not a 3D sparse checkpoint"):
        convert_file(src2d, tmp_path / "w.safetensors", target="dense3d", log=lambda *_: None)
    assert not list(tmp_path.glob("*.safetensors"))


def test_cli_convert_to_dense3d(tmp_path, capsys):
    from sparse_fcmae.cli import main

    src, _ = _checkpoint(tmp_path, 1, 3)
    out = tmp_path / "w.safetensors"
    assert main(["convert", str(src), "--to", "dense3d", "-o", str(out), "--verify"]) == 0
    said = capsys.readouterr().out
    assert "verify: max |sparse - dense3d|" in said and out.is_file()
