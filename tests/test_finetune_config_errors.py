"""finetune / linprobe reject bad settings with one `error:` line, exit 2, before writing anything."""
import pytest

from sparse_fcmae.cli import main

QUICK = ["data.img_size=64", "data.batch_size=16", "data.max_images=16", "data.max_test_images=16", "optim.epochs=1"]


@pytest.mark.parametrize("mode,overrides,needle", [
    ("finetune", ["optim.warmup_epochs=2"], "optim.warmup_epochs"),  # more warm-up than training (epochs=1)
    ("finetune", ["data.in_chans=3"], "data.in_chans"),  # the digits are grayscale
    ("finetune", ["optim.layer_decay=0"], "optim.layer_decay"),
    ("finetune", ["optim.layer_decay=1.5"], "optim.layer_decay"),
    ("finetune", ["optim.lr=-1"], "optim.lr"),
    ("linprobe", ["ema.enabled=true"], "ema.enabled"),
])
def test_bad_setting_is_one_error_line_exit_2_nothing_written(mode, overrides, needle, tmp_path, capfd):
    out_dir = tmp_path / "runs"
    capfd.readouterr()
    warmup = [] if any(o.startswith("optim.warmup_epochs") for o in overrides) else ["optim.warmup_epochs=0"]
    rc = main([mode, *QUICK, *warmup, *overrides, f"out_dir={out_dir}"])
    out, err = capfd.readouterr()
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], (rc, err[-2000:])
    assert not out_dir.exists()  # no run folder, no config.yaml


def test_layer_decay_one_is_off_and_below_one_is_on():
    import timm

    from sparse_fcmae.cli import compose
    from sparse_fcmae.finetune import build_optimizer

    model = timm.create_model("convnextv2_atto", num_classes=10, in_chans=1)
    off = build_optimizer(model, compose("finetune", ["optim.layer_decay=1.0"]), 1e-3)
    on = build_optimizer(model, compose("finetune", ["optim.layer_decay=0.5"]), 1e-3)
    assert {g.get("lr_scale", 1.0) for g in off.param_groups} == {1.0}
    assert min(g["lr_scale"] for g in on.param_groups) < 0.01
