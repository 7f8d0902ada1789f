"""The pretraining pipeline: crash-safe resume, DDP equivalence, data robustness, NaN stop, wandb + panels.

Runs go through the real entry point (``python -m sparse_fcmae.cli pretrain``, torchrun for DDP) with
tiny configs; one thread per process keeps them quick on a shared CPU.
"""
import hashlib
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from sparse_fcmae.checkpoint import load_checkpoint
from sparse_fcmae.data import RobustImageFolder, SeededSamples, load_image_chw
from sparse_fcmae.distributed import env_from_environment, first_slurm_host

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread, as the subprocess runs get (OMP_NUM_THREADS=1): fast on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY = ["data.img_size=64", "model.decoder_dim=32", "panels=2", "panel_every=0", "log_every=1"]


def _env(**extra):
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), WANDB_SILENT="true")
    env.pop("SPARSE_FCMAE_DEBUG", None)
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def _cli(*args, cwd, env=None, launcher=()):
    cmd = [sys.executable, *launcher, "-m", "sparse_fcmae.cli", "pretrain", *TINY, *args]
    return subprocess.run(cmd, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=900)


class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _main(*args, capfd):
    """The entry point in this process (no interpreter start-up): ``sparse_fcmae.cli.main``."""
    from sparse_fcmae.cli import main

    capfd.readouterr()
    code = main(["pretrain", *TINY, *args])
    out, err = capfd.readouterr()
    return _Result(code, out, err)


def _error_line(r):
    # the progress bar (tqdm, on stderr) may precede the error; nothing else may
    lines = [ln for ln in r.stderr.strip().splitlines()
             if ln.strip() and not ln.startswith(("warning:", "pretrain:"))]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), (r.returncode, r.stderr[-3000:])
    return lines[0]


def _assert_same_state(a: dict, b: dict, exact: bool, rtol=1e-5, atol=1e-7):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


# ---- resume after SIGKILL ---------------------------------------------------------------------
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path):
    args = ["data.batch_size=4", "data.max_images=24", "optim.epochs=2", "checkpoint.every_steps=2", "checkpoint.keep_last=1"]
    ref = _cli(f"run_dir={tmp_path / 'ref'}", *args, cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]

    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "sparse_fcmae.cli", "pretrain", *TINY, f"run_dir={run}", *args]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (run / "checkpoint-last.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # the first mid-epoch checkpoint is on disk: kill without warning
    proc.wait()
    killed_at = load_checkpoint(run / "checkpoint-last.pth")
    assert killed_at["global_step"] < 12 and killed_at["progress"]["micro"] > 0, "the kill must land mid-epoch"

    resumed = _cli(f"run_dir={run}", *args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    a, b = load_checkpoint(tmp_path / "ref" / "checkpoint-last.pth"), load_checkpoint(run / "checkpoint-last.pth")
    _assert_same_state(a["model"], b["model"], exact=True)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        _assert_same_state(sa, sb, exact=True)
    assert a["losses"] == b["losses"] and a["global_step"] == b["global_step"] == 12
    assert torch.equal(a["mask_generator"], b["mask_generator"])
    # last K kept: keep_last=1 leaves one numbered checkpoint beside checkpoint-last.pth; no temp files
    assert sorted(p.name for p in run.glob("checkpoint*.pth")) == ["checkpoint-1.pth", "checkpoint-last.pth"]
    assert not list(run.glob(".*.tmp"))


# ---- DDP: 2 gloo processes == 1 process with the same global batch ------------------------------
def _sigterm_run(run: pathlib.Path, args, tmp_path, env=None, signum=signal.SIGTERM):
    """Start a run, signal it once training has begun, return (exit code, stderr)."""
    cmd = [sys.executable, "-m", "sparse_fcmae.cli", "pretrain", *TINY, f"run_dir={run}", *args]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env or _env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 600
    # the first 50-step checkpoint shows training has begun (the handler is installed just before)
    while not (run / "checkpoint-last.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signum)
    t0 = time.time()
    _, err = proc.communicate(timeout=120)
    assert time.time() - t0 < 60, "must stop within 60 s of the signal"
    return proc.returncode, err


def test_sigterm_finishes_the_step_checkpoints_and_resumes_bit_identical(tmp_path):
    """What SLURM sends before it kills a preempted job: the run checkpoints its position and says so; the
    same command then ends exactly where an uninterrupted run ends."""
    args = ["data.batch_size=4", "data.max_images=400", "optim.epochs=2", "checkpoint.keep_last=1",
            "checkpoint.every_steps=50"]  # 200 steps
    ref = _cli(f"run_dir={tmp_path / 'ref'}", *args, cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "stopped"
    code, err = _sigterm_run(run, args, tmp_path)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    line = [ln for ln in err.splitlines() if "stopped by SIGTERM" in ln]
    assert len(line) == 1 and "checkpoint-last.pth written" in line[0] and "run the same command again" in line[0]
    stopped_at = load_checkpoint(run / "checkpoint-last.pth")
    step = int(re.search(r"after step (\d+)", line[0]).group(1))
    assert 50 < step < 200, "the stop must land between the 50-step checkpoints and before the end"
    assert stopped_at["global_step"] == step  # written at the stop, not the last periodic one
    resumed = _cli(f"run_dir={run}", *args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_checkpoint(tmp_path / "ref" / "checkpoint-last.pth"), load_checkpoint(run / "checkpoint-last.pth")
    _assert_same_state(a["model"], b["model"], exact=True)
    assert a["losses"] == b["losses"]


def test_sigusr1_with_requeue_calls_scontrol(tmp_path):
    """requeue=true under SLURM: after the checkpoint, ``scontrol requeue $SLURM_JOB_ID`` (a stand-in scontrol
    on PATH records its arguments)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "scontrol.args"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {record}\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242")
    run = tmp_path / "run"
    code, err = _sigterm_run(run, ["data.batch_size=4", "data.max_images=400", "optim.epochs=2", "requeue=true",
                              "checkpoint.every_steps=50"],
                             tmp_path, env=env, signum=signal.SIGUSR1)
    assert code == 128 + signal.SIGUSR1, err[-3000:]
    assert record.read_text().split() == ["requeue", "4242"]
    assert "requeued SLURM job 4242" in err and (run / "checkpoint-last.pth").is_file()


def test_one_run_per_run_dir_and_a_killed_run_leaves_no_stuck_lock(tmp_path):
    run = tmp_path / "run"
    args = ["data.batch_size=4", "data.max_images=400", "optim.epochs=2", "checkpoint.every_steps=20"]
    cmd = [sys.executable, "-m", "sparse_fcmae.cli", "pretrain", *TINY, f"run_dir={run}", *args]
    first = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while not (run / "checkpoint-last.pth").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)  # paused mid-run, lock held: the test does not race its finish
        assert first.poll() is None, "the first run ended before its first mid-epoch checkpoint was seen"
        config = (run / "config.yaml").read_bytes()
        second = _cli(f"run_dir={run}", *args, cwd=tmp_path)
        lines = [ln for ln in second.stderr.strip().splitlines() if ln.strip()]
        assert second.returncode == 2 and len(lines) == 1 and "is in use by another pretrain" in lines[0], second.stderr
        assert f"pid {first.pid}" in lines[0]
        assert (run / "config.yaml").read_bytes() == config  # the refused run wrote nothing
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = _cli(f"run_dir={run}", *args, cwd=tmp_path)  # the kernel dropped the dead run's lock
    assert third.returncode == 0 and "resuming from" in third.stdout, third.stderr[-3000:]


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(tmp_path):
    """A tmpfs sized for two checkpoints (epoch 1's numbered and last copies): epoch 2's cannot be written."""
    args = ["data.batch_size=4", "data.max_images=16", "optim.epochs=2", "checkpoint.keep_last=1", "panels=0"]
    probe = _cli(f"run_dir={tmp_path / 'probe'}", "optim.epochs=1", *args[:2], *args[3:], cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr[-2000:]
    size = (tmp_path / "probe" / "checkpoint-last.pth").stat().st_size
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(2.5 * size) + (1 << 20)}", "tmpfs", str(disk)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        r = _cli(f"run_dir={disk / 'run'}", *args, cwd=tmp_path)
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
        assert "cannot write a checkpoint" in lines[0] and "No space left" in lines[0]
        kept = load_checkpoint(disk / "run" / "checkpoint-last.pth")
        assert kept["epoch"] == 0  # epoch 1's state, whole
        assert not list((disk / "run").glob(".*.tmp")) and not list((disk / "run").glob("*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_two_process_ddp_with_accumulation_matches_one_process(tmp_path):
    common = ["data.max_images=32", "optim.epochs=1", "optim.warmup_epochs=0", "optim.lr=2e-3", "resume=never"]
    one = _cli(f"run_dir={tmp_path / 'one'}", "data.batch_size=8", *common, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")  # a free port
    # 2 processes x batch 2 x accumulation 2 = global batch 8
    two = _cli(f"run_dir={tmp_path / 'two'}", "data.batch_size=2", "optim.accum_steps=2", *common, cwd=tmp_path,
               launcher=launcher)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "batch 2 x accum 2 x 2 proc = 8" in two.stdout
    assert "Grad strides do not match" not in two.stderr  # a harmless DDP warning, once printed by every rank
    a, b = load_checkpoint(tmp_path / "one" / "checkpoint-last.pth"), load_checkpoint(tmp_path / "two" / "checkpoint-last.pth")
    assert a["global_step"] == b["global_step"] == 4
    # gradients are all-reduced in another order than one process sums them: float rounding (~1e-6)
    # that Adam's first steps amplify a little; a wrong shard, mask or loss scale moves weights by ~lr
    _assert_same_state(a["model"], b["model"], exact=False, rtol=0, atol=1e-5)
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-5)
    # AdamW's weights are blind to a constant gradient scale; its moments are not: a missing 1/accum or a
    # sum instead of a mean across processes doubles exp_avg (and quadruples exp_avg_sq)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for key in ("exp_avg", "exp_avg_sq"):
            scale = sa[key].abs().max()
            torch.testing.assert_close(sb[key], sa[key], rtol=1e-3, atol=1e-4 * float(scale) + 1e-12)
    from sparse_fcmae.models import FCMAE

    torch.manual_seed(0)  # the runs' initial weights: training moved them far beyond the tolerance above
    fresh = FCMAE("atto", in_chans=1, decoder_dim=32).state_dict()
    assert all((a["model"][k] - fresh[k]).abs().max() > 1e-3 for k in ("pred.weight", "encoder.downsample_layers.1.1.kernel"))


# ---- data: missing / empty / corrupt folders, channel rule ---------------------------------------
def _png(path: pathlib.Path, mode: str, size=(40, 48), seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    bands = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    arr = rng.integers(0, 256, (size[1], size[0], bands), dtype=np.uint8)
    Image.fromarray(arr[:, :, 0] if bands == 1 else arr, mode).save(path)
    return arr


@pytest.mark.parametrize("layout", ["missing", "empty", "flat"])
def test_missing_or_empty_data_folder_is_one_clear_error_before_anything_starts(tmp_path, layout, capfd):
    root = tmp_path / "data"
    if layout != "missing":
        (root / "cls").mkdir(parents=True)
    if layout == "flat":  # images without a class folder
        (root / "cls").rmdir()
        _png(root / "a.png", "RGB")
    r = _main("data=imagefolder", f"data.root={root}", "data.num_workers=0", f"run_dir={tmp_path / 'run'}", capfd=capfd)
    line = _error_line(r)
    assert ("not found" if layout == "missing" else "no images found") in line and str(root) in line
    if layout == "flat":
        assert "class sub-folders" in line
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_unreadable_files_are_skipped_and_counted(tmp_path, capfd):
    cls = tmp_path / "data" / "cls"
    cls.mkdir(parents=True)
    for i in range(4):
        _png(cls / f"good{i}.png", "RGB", seed=i)
    (cls / "bad0.png").write_bytes(b"not an image at all")
    good = (cls / "good0.png").read_bytes()
    (cls / "bad1.png").write_bytes(good[: len(good) // 3])  # truncated
    ds = SeededSamples(RobustImageFolder(str(tmp_path / "data"), 32, in_chans=3), seed=0)
    out = [ds[(i, 0)] for i in range(len(ds))]
    assert len(out) == 6 and all(img.shape == (3, 32, 32) and torch.isfinite(img).all() for img, _ in out)
    assert sum(n for _, n in out) == 2  # each bad file replaced by the next readable one, and counted once
    assert "skipping unreadable image" in capfd.readouterr().err


def test_channel_rule_for_grayscale_rgb_rgba_and_npy(tmp_path):
    rgba = _png(tmp_path / "x.png", "RGBA")
    x4 = load_image_chw(str(tmp_path / "x.png"), 4)
    assert x4.shape == (4, 48, 40) and torch.equal(x4, torch.from_numpy(rgba).permute(2, 0, 1).float() / 255)
    assert load_image_chw(str(tmp_path / "x.png"), 3).shape == (3, 48, 40)
    gray = _png(tmp_path / "g.png", "L")
    g2 = load_image_chw(str(tmp_path / "g.png"), 2)  # grayscale repeated to 2 channels
    assert torch.equal(g2[0], g2[1]) and torch.equal(g2[0], torch.from_numpy(gray[:, :, 0]).float() / 255)
    arr = np.random.default_rng(0).random((6, 20, 30)).astype(np.float32)  # (C, H, W), 6 bands
    np.save(tmp_path / "m.npy", arr)
    m4 = load_image_chw(str(tmp_path / "m.npy"), 4)  # truncated to the first 4
    assert torch.equal(m4, torch.from_numpy(arr[:4]))


def test_seeded_samples_do_not_touch_global_rng_and_repeat_exactly(tmp_path):
    from sparse_fcmae.data import DigitsDataset

    ds = SeededSamples(DigitsDataset(img_size=32, flip=True), seed=3)
    state = torch.get_rng_state()
    imgs = [ds[(0, e)][0] for e in range(16)]  # one sample over 16 epochs: flipped about half the time
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, ds[(0, e)][0]) for e, x in enumerate(imgs))  # same (index, epoch), same image
    flipped = sum(not torch.equal(x, imgs[0]) for x in imgs)
    assert 0 < flipped < 16 and all(torch.equal(x, imgs[0]) or torch.equal(x, imgs[0].flip(-1)) for x in imgs)


# ---- config errors, NaN stop ---------------------------------------------------------------------
@pytest.mark.parametrize("override,needle", [
    ("optim.accum_steps=0", "accum_steps"), ("precision=fp8", "precision"), ("optim.warmup_epochs=9", "warmup_epochs"),
    ("optim.clip_grad=-1", "clip_grad"), ("optim.lr=-1", "lr"), ("checkpoint.keep_last=0", "keep_last"),
    ("data.img_size=0", "divisible by 32"), ("data.in_chans=0", "in_chans")])
def test_bad_config_values_are_rejected_with_the_key(override, needle):
    from sparse_fcmae.cli import compose
    from sparse_fcmae.training import validate_config

    cfg = compose("pretrain", [override])
    with pytest.raises(ValueError, match=needle):
        validate_config(cfg)


def test_nan_loss_stops_clearly_and_keeps_the_last_good_checkpoint(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run = tmp_path / "run"
    args = [f"run_dir={run}", "data.batch_size=4", "data.max_images=8", "optim.warmup_epochs=0"]
    r = _main(*args, "optim.epochs=1", capfd=capfd)
    assert r.returncode == 0, r.stderr[-3000:]
    digest = hashlib.sha256((run / "checkpoint-last.pth").read_bytes()).hexdigest()
    # continue the run with an absurd learning rate: the parameters blow up, the loss turns inf/NaN
    r = _main(*args, "optim.epochs=3", "optim.lr=1e30", capfd=capfd)
    line = _error_line(r)
    assert "loss is" in line or "non-finite" in line, line
    assert hashlib.sha256((run / "checkpoint-last.pth").read_bytes()).hexdigest() == digest
    assert load_checkpoint(run / "checkpoint-last.pth")["losses"][0] < 2.0


# ---- wandb offline + panels through the hydra entry point -----------------------------------------
def test_digits_pretraining_with_wandb_offline_writes_run_files_and_panels(tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the config chooses offline
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    r = _main(f"run_dir={run}", "logger=wandb", "logger.mode=offline", "data.batch_size=8", "data.max_images=16",
              "optim.epochs=2", "panel_every=1", capfd=capfd)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb")), list((run / "wandb").iterdir())
    pngs = sorted(p.name for p in run.glob("*.png"))
    assert pngs == ["reconstruction-e0001.png", "reconstruction.png"]
    logged = list((runs[0] / "files" / "media" / "images").glob("reconstruction_*.png"))
    assert len(logged) == 2  # the panels were logged to wandb as well
    # the binary run log holds the scalar metrics by name
    blob = next(runs[0].glob("run-*.wandb")).read_bytes()
    for key in (b"train/loss", b"train/lr", b"train/img_per_s", b"train/visible_fraction", b"train/memory_gb",
                b"mask_ratio"):  # ... and the run's config
        assert key in blob, key


def test_wandb_mode_environment_variable_wins(tmp_path, monkeypatch):
    from sparse_fcmae.logger import WandbLogger

    cfg = OmegaConf.create({"logger": {"name": "wandb", "project": "t", "mode": "offline", "entity": None}, "x": 1})
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SILENT", "true")
    lg = WandbLogger(cfg, tmp_path)
    assert lg.mode == "disabled"
    lg.log({"a": 1.0}, step=1)
    lg.finish()
    assert not (tmp_path / "wandb").exists()


# ---- launch environment --------------------------------------------------------------------------
def test_slurm_variables_are_honoured_when_torchrun_is_absent():
    env, extra = env_from_environment({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                                       "SLURM_NODELIST": "gpu[03-04,07]", "SLURM_JOB_ID": "12345"})
    assert (env.rank, env.world_size, env.local_rank) == (5, 8, 1)
    assert extra == {"MASTER_ADDR": "gpu03", "MASTER_PORT": str(20000 + 12345 % 20000)}
    env, extra = env_from_environment({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"})
    assert (env.rank, env.world_size, extra) == (1, 2, {})  # torchrun's variables win
    assert env_from_environment({})[0].world_size == 1
    assert first_slurm_host("node1,node2") == "node1" and first_slurm_host("a-b[9]") == "a-b9"


def test_bf16_autocast_runs_the_sparse_encoder():
    from sparse_fcmae.models import FCMAE

    model = FCMAE("atto", in_chans=3, decoder_dim=32)
    imgs = torch.randn(1, 3, 64, 64)
    mask = model.random_masking(imgs, torch.Generator().manual_seed(0))
    ref, _, _ = model(imgs, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the same code path as CUDA autocast
        loss, pred, _ = model(imgs, mask)
    assert pred.dtype == torch.bfloat16 and abs(loss.item() - ref.item()) < 2e-2 * ref.item()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_synthetic_data_any_channel_count_deterministic():
    from sparse_fcmae.data import SyntheticDataset

    ds = SyntheticDataset(num_images=8, img_size=64, in_chans=4, seed=1)
    a, b = ds[3][0], ds[3][0]
    assert a.shape == (4, 64, 64) and torch.equal(a, b) and not torch.equal(a, ds[4][0])
    assert not torch.equal(a, SyntheticDataset(8, 64, 4, seed=2)[3][0])
    assert 0.3 < a.std() < 3.0  # a real image-like signal, not constant


def test_last_k_checkpoints_kept_and_auto_resume_falls_back_past_a_corrupt_newest(tmp_path):
    from sparse_fcmae.training.state import check_compatible, find_resume_checkpoint, save_training_state

    cfg = OmegaConf.create({"resume": "auto", "model": {"name": "atto"}, "data": {"in_chans": 1}})
    for epoch in range(4):
        state = {"epoch": epoch, "w": torch.full((3,), float(epoch)), "config": {"model": {"name": "atto"}}}
        save_training_state(tmp_path / "checkpoint-last.pth", state, tmp_path / f"checkpoint-{epoch}.pth", keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["checkpoint-2.pth", "checkpoint-3.pth", "checkpoint-last.pth"]
    ckpt, path = find_resume_checkpoint(cfg, tmp_path)
    assert path.name == "checkpoint-last.pth" and ckpt["epoch"] == 3
    data = (tmp_path / "checkpoint-last.pth").read_bytes()
    (tmp_path / "checkpoint-last.pth").write_bytes(data[: len(data) // 2])  # e.g. a full disk, by another tool
    ckpt, path = find_resume_checkpoint(cfg, tmp_path)
    assert path.name == "checkpoint-3.pth" and torch.equal(ckpt["w"], torch.full((3,), 3.0))
    assert find_resume_checkpoint(OmegaConf.merge(cfg, {"resume": "never"}), tmp_path) == (None, None)
    with pytest.raises(ValueError, match="model.name=atto"):
        check_compatible(ckpt, OmegaConf.merge(cfg, {"model": {"name": "tiny"}}), path)
