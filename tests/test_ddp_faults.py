"""Faults of a DDP run (2 gloo processes under torchrun): a rank killed or hung mid-run, unreadable files on
one rank. The survivor stops within a bounded time with one line; the same command resumes."""
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from _pretrain_run import TINY, _assert_same_state, _cli, _env, _one_thread  # noqa: F401  (_one_thread: an autouse fixture)

from sparse_fcmae.checkpoint import load_checkpoint

TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")  # a free port
# 2 processes x batch 2 over 64 images: 16 steps, a checkpoint every 2
ARGS = ["data.batch_size=2", "data.max_images=64", "optim.epochs=1", "checkpoint.every_steps=2", "panels=0"]


def _ranks(launcher: subprocess.Popen, deadline: float) -> dict[int, int]:
    """pid of each rank: torchrun's children, told apart by their RANK variable."""
    while time.time() < deadline:
        kids = []
        for task in os.listdir(f"/proc/{launcher.pid}/task"):
            kids += [int(k) for k in pathlib.Path(f"/proc/{launcher.pid}/task/{task}/children").read_text().split()]
        ranks = {}
        for pid in kids:
            env = pathlib.Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            ranks.update({int(e[5:]): pid for e in env if e.startswith(b"RANK=")})
        if len(ranks) == 2:
            return ranks
        time.sleep(0.05)
    raise AssertionError("torchrun did not start two ranks")


def _start_and_wait_for_checkpoint(run: pathlib.Path, tmp_path, args, err_file):
    cmd = [sys.executable, *TORCHRUN, "-m", "sparse_fcmae.cli", "pretrain", *TINY, f"run_dir={run}", *args]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=err_file, text=True)
    deadline = time.time() + 600
    while not (run / "checkpoint-last.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before its first mid-epoch checkpoint was seen"
    return proc, _ranks(proc, deadline)


def _error_lines(text: str) -> list[str]:
    # a killed rank 0 may leave its progress bar mid-line: the survivor's line then follows it on that line
    return [ln[ln.index("error: "):] for ln in text.splitlines() if "error: " in ln]


@pytest.mark.parametrize("victim", [1, 0])  # rank 0 is the one that writes the checkpoints
def test_a_killed_rank_stops_the_other_with_one_line_and_the_same_command_resumes(tmp_path, victim):
    run = tmp_path / "run"
    survivor = 1 - victim
    with open(tmp_path / "stderr", "w+") as err:
        proc, ranks = _start_and_wait_for_checkpoint(run, tmp_path, ARGS, err)
        os.kill(ranks[victim], signal.SIGKILL)  # the first mid-epoch checkpoint is on disk: kill without warning
        t0 = time.time()
        proc.communicate(timeout=120)
        elapsed = time.time() - t0
        err.seek(0)
        stderr = err.read()
    assert proc.returncode != 0
    # gloo sees the closed connection at once; torchrun's agent then SIGTERMs the survivor, which must not wait
    assert elapsed < 60, f"the survivor took {elapsed:.0f} s to stop"
    lines = _error_lines(stderr)
    assert len(lines) == 1, stderr[-4000:]
    assert lines[0].startswith(f"error: rank {victim} of 2 stopped or stopped answering (")
    assert f"rank {survivor} stops too" in lines[0]
    assert f"run the same command again to resume from the last checkpoint in {run}" in lines[0]
    # no raw gloo text, no traceback from our code (torchrun's own report of the failed child may follow)
    assert "GLHF" not in stderr and 'File "' + str(pathlib.Path(__file__).parents[1] / "sparse_fcmae") not in stderr
    killed_at = load_checkpoint(run / "checkpoint-last.pth")
    assert 0 < killed_at["global_step"] < 16 and killed_at["progress"]["micro"] > 0, "the kill must land mid-epoch"

    resumed = _cli(f"run_dir={run}", *ARGS, cwd=tmp_path, launcher=TORCHRUN)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {run / 'checkpoint-last.pth'} (epoch 0, micro-batch {killed_at['progress']['micro']})" in resumed.stdout
    assert load_checkpoint(run / "checkpoint-last.pth")["global_step"] == 16


def test_a_hung_rank_stops_the_other_after_dist_timeout_s(tmp_path):
    """A rank that stops answering without closing its connections (SIGSTOP here; a frozen host, a deadlock in
    practice): the survivor's collective times out after ``dist_timeout_s`` instead of waiting forever."""
    run = tmp_path / "run"
    timeout_s = 8
    with open(tmp_path / "stderr", "w+") as err:
        proc, ranks = _start_and_wait_for_checkpoint(run, tmp_path, [*ARGS, f"dist_timeout_s={timeout_s}"], err)
        os.kill(ranks[1], signal.SIGSTOP)
        t0 = time.time()
        try:
            while time.time() - t0 < 120 and not _error_lines(pathlib.Path(err.name).read_text()):
                time.sleep(0.1)
            elapsed = time.time() - t0
        finally:
            os.kill(ranks[1], signal.SIGCONT)  # let torchrun's SIGTERM reach it (it stops too: its peer is gone)
            proc.communicate(timeout=120)
        err.seek(0)
        stderr = err.read()
    lines = _error_lines(stderr)
    assert lines, stderr[-4000:]
    assert lines[0].startswith("error: rank 1 of 2 stopped or stopped answering (Timed out waiting"), lines
    assert "rank 0 stops too" in lines[0]
    assert timeout_s - 1 < elapsed < timeout_s + 30, elapsed
    assert proc.returncode != 0


def _image_folder(root: pathlib.Path, good: int, bad: int) -> None:
    from PIL import Image

    cls = root / "cls"
    cls.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(good):
        Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), "L").save(cls / f"img{i:02d}.png")
    for i in range(bad):  # spread through the sorted file list, so that both ranks' shards hold some
        (cls / f"img{i * 5:02d}b.png").write_bytes(b"not an image")


def test_unreadable_files_on_one_rank_keep_the_ranks_in_step(tmp_path):
    """A bad file is replaced by the next readable one on the rank that reads it, so both ranks keep their
    batch size and step count (a rank dropping the sample or the batch would leave the other waiting in a
    collective); the skips are counted across ranks; the weights equal one process's on the same data."""
    data = tmp_path / "data"
    _image_folder(data, good=29, bad=3)  # 32 files: 8 steps of 2 x 2 images per epoch
    common = ["data=imagefolder", f"data.root={data}", "data.num_workers=0", "data.in_chans=1", "optim.epochs=2",
              "optim.warmup_epochs=0", "optim.lr=2e-3", "panels=0", "dist_timeout_s=60"]
    one = _cli(f"run_dir={tmp_path / 'one'}", "data.batch_size=4", *common, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _cli(f"run_dir={tmp_path / 'two'}", "data.batch_size=2", *common, cwd=tmp_path, launcher=TORCHRUN)
    assert two.returncode == 0, two.stderr[-3000:]
    # each bad file once per epoch, whichever rank read it
    assert "; 6 unreadable file read(s) skipped" in one.stdout and "; 6 unreadable file read(s) skipped" in two.stdout, two.stdout
    a, b = load_checkpoint(tmp_path / "one" / "checkpoint-last.pth"), load_checkpoint(tmp_path / "two" / "checkpoint-last.pth")
    assert a["global_step"] == b["global_step"] == 16
    _assert_same_state(a["model"], b["model"], exact=False, rtol=0, atol=1e-5)
