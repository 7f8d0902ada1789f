"""Faults a long pretraining run meets: SIGKILL, SIGTERM/SIGUSR1 (SLURM), a second run on the same folder,
a full disk, a NaN loss, a corrupt newest checkpoint. Each leaves a resumable run, bit-identical where it resumes."""
import hashlib
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from _pretrain_run import (  # noqa: F401  (_one_thread: an autouse fixture)
    TINY,
    _assert_same_state,
    _cli,
    _env,
    _error_line,
    _main,
    _one_thread,
    fake_scontrol,
)
from omegaconf import OmegaConf

from sparse_fcmae.checkpoint import load_checkpoint


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
    env, record = fake_scontrol(tmp_path)
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
