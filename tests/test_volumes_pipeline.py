"""Volume pretraining end to end: ``model.spatial_dims=3 data=synthetic3d`` through the CLI (checkpoint,
resume, middle-slice panel), the synthetic volumes, and one-line config errors."""
import pytest
import torch
from _pretrain_run import _one_thread  # noqa: F401  (an autouse fixture: one thread)

from sparse_fcmae.data.volumes import SyntheticVolumeDataset
from sparse_fcmae.visualize import reconstruction_panel

TINY3D = ["model.spatial_dims=3", "data=synthetic3d", "device=cpu", "data.img_size=64", "data.num_images=4",
          "data.batch_size=2", "model.decoder_dim=32", "panels=2", "panel_every=0", "log_every=1"]


def _main(*args, capfd):
    from sparse_fcmae.cli import main

    capfd.readouterr()
    code = main(["pretrain", *args])
    out, err = capfd.readouterr()
    return code, out, err


def test_synthetic_volumes_any_channel_count_deterministic():
    ds = SyntheticVolumeDataset(num_images=4, img_size=32, in_chans=2, seed=1)
    a, b = ds[3][0], ds[3][0]
    assert a.shape == (2, 32, 32, 32) and torch.equal(a, b) and not torch.equal(a, ds[2][0])
    assert not torch.equal(a, SyntheticVolumeDataset(4, 32, 2, seed=2)[3][0])
    assert 0.3 < a.std() < 3.0
    with pytest.raises(ValueError, match="divisible by 32"):
        SyntheticVolumeDataset(img_size=48)


def test_cli_pretrains_volumes_end_to_end_and_resumes(tmp_path, capfd):
    run = tmp_path / "run"
    code, out, err = _main(*TINY3D, "optim.epochs=1", f"run_dir={run}", capfd=capfd)
    assert code == 0, err[-3000:]
    assert "volume" in out and "64^3 voxels" in out
    ckpt = torch.load(run / "checkpoint-last.pth", weights_only=True)
    model = ckpt["model"]
    assert model["encoder.stages.0.0.dwconv.kernel"].shape == (343, 40)
    assert model["encoder.downsample_layers.0.0.weight"].shape == (40, 1, 4, 4, 4)
    assert model["pred.weight"].shape == (32 ** 3, 32, 1, 1, 1)
    assert all(torch.isfinite(torch.tensor(x)) for x in ckpt["losses"])
    from PIL import Image

    with Image.open(run / "reconstruction.png") as im:  # the middle slices: 3 columns, 2 rows of 64 x 64
        assert im.size[0] > 3 * 64 and 2 * 64 < im.size[1] < 3 * 64
    code, out, err = _main(*TINY3D, "optim.epochs=2", f"run_dir={run}", capfd=capfd)
    assert code == 0 and "resuming" in out, err[-3000:]
    assert len(torch.load(run / "checkpoint-last.pth", weights_only=True)["losses"]) == 2
    # the same folder with an image model is refused by name
    code, out, err = _main(*TINY3D, "optim.epochs=3", "model.kernel_size=5", f"run_dir={run}", capfd=capfd)
    assert code == 2 and "model.kernel_size" in err


@pytest.mark.parametrize("overrides,needle", [
    (["model.spatial_dims=3"], "data=digits gives images, model.spatial_dims=3 expects volumes"),
    (["data=synthetic3d"], "data=synthetic3d gives volumes, model.spatial_dims=2 expects images"),
    (["model.spatial_dims=4"], "model.spatial_dims must be 2 .images. or 3 .volumes."),
    (["model.kernel_size=9"], "model.kernel_size must be one of"),
    (["model.spatial_dims=3", "data=synthetic3d", "data.img_size=32"], "keeps no patch"),
])
def test_bad_volume_configs_are_rejected_with_the_key(overrides, needle):
    from sparse_fcmae.cli import compose
    from sparse_fcmae.training import validate_config

    cfg = compose("pretrain", overrides)
    with pytest.raises(ValueError, match=needle):
        validate_config(cfg)


def test_the_panel_of_a_volume_is_its_middle_slice():
    vols = torch.randn(2, 1, 64, 32, 64)
    recon = torch.randn_like(vols)
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]])  # grid (2, 1, 2): plane 1 = patches 2, 3
    panel = reconstruction_panel(vols, mask, recon)
    expected = reconstruction_panel(vols[:, :, 32], mask[:, 2:], recon[:, :, 32])
    assert torch.equal(panel, expected)
