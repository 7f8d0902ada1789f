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


# ---- resume and logger: refused before anything is written --------------------------------------
QUICK = ["data.max_images=32", "data.batch_size=16"]


def test_a_refused_resume_leaves_the_run_folders_config_untouched(tmp_path, capfd):
    run_dir = tmp_path / "run"
    code, _, err = run("pretrain", *TINY, *QUICK, f"run_dir={run_dir}", capfd=capfd)
    assert code == 0, err[-3000:]
    before = (run_dir / "config.yaml").read_bytes()
    files = sorted(p.name for p in run_dir.iterdir())
    code, _, err = run("pretrain", *TINY, *QUICK, "model=femto", f"run_dir={run_dir}", capfd=capfd)
    assert "model.name=atto" in error_line(code, err)
    assert (run_dir / "config.yaml").read_bytes() == before  # still says atto, as its checkpoints
    assert sorted(p.name for p in run_dir.iterdir()) == files


def test_a_missing_resume_path_writes_nothing(tmp_path, capfd):
    run_dir = tmp_path / "run"
    code, _, err = run("pretrain", *TINY, f"resume={tmp_path / 'nosuch.pth'}", f"run_dir={run_dir}", capfd=capfd)
    line = error_line(code, err)
    assert "resume=" in line and "nosuch.pth" in line, line
    assert not run_dir.exists()


def test_wandb_online_without_credentials_writes_nothing(tmp_path, capfd, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "netrc").write_text("machine example.org login u password p\n")  # no W&B entry
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    run_dir = tmp_path / "run"
    code, _, err = run("pretrain", *TINY, "logger=wandb", "logger.mode=online", f"run_dir={run_dir}", capfd=capfd)
    assert "logger.mode=online" in error_line(code, err)
    assert not run_dir.exists()


def test_a_run_started_from_another_checkpoint_restarts_from_its_own_newest(tmp_path, capfd):
    first, second = tmp_path / "first", tmp_path / "second"
    code, _, err = run("pretrain", *TINY, *QUICK, f"run_dir={first}", capfd=capfd)
    assert code == 0, err[-3000:]
    start = first / "checkpoint-last.pth"
    code, out, err = run("pretrain", *TINY, *QUICK, "optim.epochs=2", f"resume={start}", f"run_dir={second}", capfd=capfd)
    assert code == 0 and f"resuming from {start}" in out, err[-3000:]
    # the same command again (e.g. a requeued job): it continues from the second folder, not from `start`
    code, out, err = run("pretrain", *TINY, *QUICK, "optim.epochs=3", f"resume={start}", f"run_dir={second}", capfd=capfd)
    assert code == 0, err[-3000:]
    assert f"resuming from {second / 'checkpoint-last.pth'} (epoch 2," in out, out
    assert torch.load(second / "checkpoint-last.pth", weights_only=True)["epoch"] == 2


def test_panels_zero_trains_every_epoch_and_draws_no_panel(tmp_path, capfd):
    run_dir = tmp_path / "run"
    code, out, err = run("pretrain", *TINY, *QUICK, "optim.epochs=2", "panels=0", "panel_every=1", f"run_dir={run_dir}",
                         capfd=capfd)
    assert code == 0, err[-3000:]
    assert len(torch.load(run_dir / "checkpoint-last.pth", weights_only=True)["losses"]) == 2
    assert not list(run_dir.glob("*.png"))


# ---- small things: --version, convert -o <folder>, "1 epoch" ------------------------------------------
def test_version_prints_the_package_version(capfd):
    from importlib.metadata import PackageNotFoundError, version

    import sparse_fcmae

    try:
        expected = version("sparse-fcmae")
    except PackageNotFoundError:  # a source tree: the package's own attribute
        expected = sparse_fcmae.__version__
    code, out, _ = run("--version", capfd=capfd)
    assert code == 0 and out.strip() == f"sparse-fcmae {expected}"


def test_convert_to_an_existing_folder_names_the_folder(tmp_path, capfd):
    import timm

    src = tmp_path / "w.pth"
    torch.save(timm.create_model("convnextv2_atto", pretrained=False, num_classes=0).state_dict(), src)
    folder = tmp_path / "out"
    folder.mkdir()
    code, _, err = run("convert", str(src), "-o", str(folder), capfd=capfd)
    line = error_line(code, err)
    assert f"-o {folder} is a folder" in line and ".partial" not in line, line
    assert not any(folder.iterdir()) and sorted(p.name for p in tmp_path.iterdir()) == ["out", "w.pth"]


def test_one_epoch_is_singular(tmp_path, capfd):
    code, out, err = run("pretrain", *TINY, *QUICK, f"run_dir={tmp_path / 'run'}", capfd=capfd)
    assert code == 0, err[-3000:]
    assert " 1 epoch x 2 steps," in out and "1 epochs" not in out, out


@pytest.mark.parametrize("command", ["pretrain", "finetune", "linprobe"])
def test_cfg_job_prints_the_resolved_config_and_writes_nothing(tmp_path, capfd, command):
    """Hydra's --cfg job, as users of hydra apps try first: the config with the overrides applied."""
    from omegaconf import OmegaConf

    code, out, err = run(command, "model=femto", "seed=7", f"out_dir={tmp_path / 'runs'}", "--cfg", "job", capfd=capfd)
    assert code == 0, err
    cfg = OmegaConf.create(out)
    assert cfg.model.name == "femto" and cfg.seed == 7
    assert not (tmp_path / "runs").exists()


def test_help_lists_the_config_groups(capfd):
    code, out, _ = run("pretrain", "--help", capfd=capfd)
    assert code == 0
    assert "model=atto|base|femto|huge|large|nano|pico|tiny" in out and "data=digits|imagefolder|synthetic" in out


def test_multirun_is_refused_in_one_line(tmp_path, capfd):
    code, _, err = run("pretrain", "--multirun", "mask_ratio=0.5,0.6", f"out_dir={tmp_path / 'runs'}", capfd=capfd)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "--multirun is not supported" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_an_all_corrupt_image_folder_is_one_error_before_anything_is_written(tmp_path, capfd):
    cls = tmp_path / "data" / "c"
    cls.mkdir(parents=True)
    for i in range(4):
        (cls / f"x{i}.jpg").write_text("not an image")
    run_dir = tmp_path / "run"
    code, _, err = run("pretrain", "data=imagefolder", f"data.root={tmp_path / 'data'}", "data.img_size=64",
                       "data.num_workers=0", "data.batch_size=2", f"run_dir={run_dir}", capfd=capfd)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "no readable image" in lines[0] and "4 files tried" in lines[0]
    assert not run_dir.exists()


def test_finetune_says_one_epoch_in_the_singular(tmp_path, capfd):
    code, out, err = run("linprobe", "data.max_images=40", "data.max_test_images=20", "optim.epochs=1",
                         "optim.warmup_epochs=0", "data.img_size=64", f"out_dir={tmp_path}", capfd=capfd)
    assert code == 0, err
    assert ", 1 epoch, run folder" in out and "1 epochs" not in out


def test_a_config_missing_keys_takes_them_from_the_yaml():
    """conf/pretrain.yaml is the one source of defaults: a config written by hand (or by an older version)
    gains the keys it lacks with the YAML's values, and keeps its own."""
    from omegaconf import OmegaConf

    from sparse_fcmae.config import compose, with_defaults

    full = compose("pretrain", ["data=imagefolder", "data.root=/x"])
    partial = OmegaConf.to_container(full)
    for key in ("checkpoint", "panels", "precision", "requeue"):
        del partial[key]
    del partial["optim"]["accum_steps"]
    partial["panel_every"] = 3
    merged = with_defaults(OmegaConf.create(partial), "pretrain")
    assert merged.checkpoint == full.checkpoint and merged.optim.accum_steps == full.optim.accum_steps
    assert (merged.panels, merged.precision, merged.requeue) == (full.panels, full.precision, full.requeue)
    assert merged.panel_every == 3 and merged.data.root == "/x" and merged.data.name == "imagefolder"
