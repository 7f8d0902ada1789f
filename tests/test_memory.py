"""Memory stays flat over a long run: nothing a training step makes outlives it (a kept loss, a graph, a
growing history of tensors would show as resident memory growing step after step)."""
import subprocess
import sys
import time

import pytest
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


def _gpu_memory_trace(device, steps: int, batch: int = 8, img: int = 128) -> list[tuple[int, int]]:
    """(allocated, reserved) bytes after each training step of the sparse FCMAE (atto), fused AdamW, random
    masks: the number of visible sites changes every step, so the caching allocator sees new sizes each time."""
    import torch

    from sparse_fcmae.masking import random_patch_mask
    from sparse_fcmae.models import FCMAE
    from sparse_fcmae.optim import adamw

    torch.manual_seed(0)
    model = FCMAE("atto", in_chans=3, decoder_dim=64, encoder="sparse").to(device)
    opt = adamw(model.parameters(), device, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    trace = []
    for _ in range(steps):
        x = torch.randn(batch, 3, img, img, generator=g).to(device)
        ratio = 0.45 + 0.3 * float(torch.rand((), generator=g))
        mask = random_patch_mask(batch, (img // 32,) * 2, ratio, generator=g).to(device)
        loss, _, _ = model(x, mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        trace.append((torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)))
    return trace


@pytest.mark.gpu
def test_gpu_memory_is_flat_over_a_long_run(cuda_device, record_property):
    """300 steps with changing visible counts: what is allocated after a step late in the run (steps 200-300)
    is at most what was allocated in its middle (100-200) plus 8 MiB (parameters, Adam state, ME's coordinate maps are
    freed with each step's tensors); the allocator's reserve may grow by fragmentation, but by less than 64 MiB."""
    trace = _gpu_memory_trace(cuda_device, 300)
    alloc = [a for a, _ in trace]
    reserved = [r for _, r in trace]
    middle, late = max(alloc[100:200]), max(alloc[200:])
    record_property("allocated_mib", {"middle": middle / 2**20, "late": late / 2**20})
    record_property("reserved_mib", {"middle": max(reserved[100:200]) / 2**20, "late": max(reserved[200:]) / 2**20})
    assert late <= middle + 8 * 2**20, (middle, late)  # 8 MiB: a kept graph or history grows by more each step
    assert max(reserved[200:]) - max(reserved[100:200]) < 64 * 2**20
