"""benchmarks/gpu_bench.sh rehearsed on the CPU (GPU_BENCH_DEVICE=cpu): every step a GPU lease runs (the device
checks, the kernel benchmark, the searches, the 3D run, the profile) starts, finishes and writes its file, so a
broken step shows in CI, not in a lease's minutes. Tiny sizes and eager execution: the script's plumbing, not
the measurements (the compiled paths have their own tests)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_bench.sh"
TINY = "--sizes atto --batch 1 --img-size 64 --mask-ratios 0.6 --modes train --layouts nchw --warmup 1 --steps 1"


def _run(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=full, capture_output=True, text=True, timeout=900)


def test_rehearsal_runs_every_step_and_writes_its_files(tmp_path):
    r = _run(tmp_path, GPU_BENCH_DEVICE="cpu", TOTAL_BUDGET_S="400", SKIP="cudagraphs sweep",
             KERNELS_ARGS="--batch 1 --shapes atto-s2 --warmup 1 --repeats 1 --skip-slow",
             SEARCH_ARGS=f"{TINY} --executions eager", VOL3D_S="60", VOL3D_ARGS=f"{TINY} --executions eager",
             GRAPH_EAGER_ARGS=f"{TINY} --executions eager --sparse-graph",
             PROFILE_ARGS="--size atto --batch 1 --img-size 64 --steps 1 --sweep=", PROFILE_RESERVE_S="60")
    out = tmp_path / "out"
    log = (out / "gpu_bench.log").read_text()
    assert r.returncode == 0, log[-3000:]
    assert "rehearsal on the CPU" in log and "error:" not in log, log[-3000:]
    tests = json.loads((out / "gpu_tests.json").read_text())["tests"]
    assert tests and all(t["outcome"] in ("passed", "skipped") for t in tests)
    assert any(t["outcome"] == "passed" for t in tests)
    assert json.loads((out / "kernels_cpu_float32.json").read_text())
    day = next(out.glob("gpu-search-fp32-*.json")).stem.removeprefix("gpu-search-fp32-")
    for label in (f"gpu-search-fp32-{day}", f"gpu-search-bf16-{day}", f"gpu-graph-eager-bf16-{day}", f"gpu-3d-fp32-{day}"):
        (row,) = json.loads((out / f"{label}.json").read_text())["results"]
        assert row["variants"]["sparse"]["error"] is None and row["variants"]["sparse"]["images_per_s"] > 0, label
    assert "## sparse" in log and "## dense_masked" in log  # the profile's report went into the log


def test_a_wrong_device_is_one_line_and_exit_2(tmp_path):
    r = _run(tmp_path, GPU_BENCH_DEVICE="tpu")
    assert r.returncode == 2
    assert r.stderr.strip() == "gpu_bench.sh: GPU_BENCH_DEVICE must be cuda or cpu, got 'tpu'"


@pytest.fixture(autouse=True)
def _no_stray_outputs():
    """The rehearsal writes only under OUT: not into benchmarks/results/."""
    before = set((ROOT / "benchmarks" / "results").iterdir())
    yield
    assert set((ROOT / "benchmarks" / "results").iterdir()) == before
