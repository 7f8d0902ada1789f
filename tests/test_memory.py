"""Memory stays flat over a long run: nothing a training step makes outlives it (a kept loss, a graph, a
growing history of tensors would show as resident memory growing step after step)."""
import subprocess
import sys
import time

from _pretrain_run import TINY, _env, _one_thread  # noqa: F401  (_one_thread: an autouse fixture)


def _rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


def test_resident_memory_is_flat_over_the_second_half_of_a_long_run(tmp_path):
    """400 steps (4 epochs of 100): the peak resident memory late in the run (70-92% of it) is within 3% (and
    24 MiB) of the peak in its middle (45-70%). Start-up (imports, allocator warm-up) and the end (the last
    checkpoint, tear-down: +50 MiB once, measured) are not judged; 800 steps measured flat to the MiB."""
    cmd = [sys.executable, "-m", "sparse_fcmae.cli", "pretrain", *TINY, f"run_dir={tmp_path / 'run'}", "panels=0",
           "data.batch_size=8", "data.max_images=800", "optim.epochs=4", "log_every=50"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples = []
    while proc.poll() is None:
        rss = _rss_mib(proc.pid)
        if rss is not None:
            samples.append(rss)
        time.sleep(0.05)
    err = proc.stderr.read()
    assert proc.returncode == 0, err[-3000:]
    assert len(samples) >= 40, "the run was too short to judge"
    n = len(samples)
    middle, late = max(samples[45 * n // 100: 70 * n // 100]), max(samples[70 * n // 100: 92 * n // 100])
    assert late - middle < max(0.03 * middle, 24.0), (middle, late)
