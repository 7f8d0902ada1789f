"""The documented commands' error paths, through the real entry point (``sparse_fcmae.cli.main``):
one ``error:`` line, exit code 2, and nothing written."""
import pytest
import torch

TINY = ["optim.epochs=1", "data.batch_size=32", "data.img_size=64", "model.decoder_dim=32", "panels=2", "panel_every=0", "log_every=1"]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("SPARSE_FCMAE_DEBUG", raising=False)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(*argv, capfd):
    from sparse_fcmae.cli import main

    capfd.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capfd.readouterr()
    return code, out, err


def error_line(code, err):
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not ln.startswith(("warning:", "pretrain:"))]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (code, err[-3000:])
    return lines[0]


# ---- pretrain: bad values are refused before the run folder exists ---------------------------------
@pytest.mark.parametrize("ratio,img", [(0.9, 64), (0.95, 128), (0.99, 224)])
def test_a_mask_ratio_that_keeps_no_patch_is_refused_before_writing(tmp_path, capfd, ratio, img):
    assert int((img // 32) ** 2 * (1 - ratio)) == 0  # the official kept count: no visible patch
    run_dir = tmp_path / "run"
    code, _, err = run("pretrain", *TINY, f"mask_ratio={ratio}", f"data.img_size={img}", f"run_dir={run_dir}", capfd=capfd)
    line = error_line(code, err)
    assert "mask_ratio" in line and "data.img_size" in line, line
    assert not run_dir.exists()


@pytest.mark.parametrize("override,needle", [
    ("mask_ratio=0", "mask_ratio"), ("mask_ratio=0.0", "mask_ratio"),
    ("data.max_images=0", "data.max_images"), ("data.max_images=-3", "data.max_images"),
    ("panel_every=-1", "panel_every"), ("log_every=0", "log_every"), ("panels=-1", "panels"),
    ("seed=abc", "seed"), ("mask_ratio=abc", "mask_ratio"), ("data.img_size=abc", "data.img_size"),
    ("data.max_image=16", "+data.max_image=16"),  # hydra's own hint survives the one-line error
])
def test_bad_pretrain_values_name_their_key_and_write_nothing(tmp_path, capfd, override, needle):
    run_dir = tmp_path / "run"
    code, _, err = run("pretrain", *TINY, override, f"run_dir={run_dir}", capfd=capfd)
    assert needle in error_line(code, err)
    assert not run_dir.exists()
