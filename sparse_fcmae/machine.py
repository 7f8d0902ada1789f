"""The machine description stored with every measured result (bench, kernels, probes, conversions)."""
from __future__ import annotations

import datetime
import os
import pathlib
import platform
import subprocess

import torch


def git_commit() -> str | None:
    """The checkout's commit (``-dirty`` with uncommitted changes to tracked files); ``SPARSE_FCMAE_COMMIT``
    wins: a copy of the tree without its history (a lent GPU machine) is told its commit by the caller."""
    if os.environ.get("SPARSE_FCMAE_COMMIT"):
        return os.environ["SPARSE_FCMAE_COMMIT"]
    here = pathlib.Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if commit and dirty else commit


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _minkowskiengine() -> str | None:
    try:  # the version of an importable MinkowskiEngine only (a broken install counts as none)
        import MinkowskiEngine as ME
    except Exception:
        return None
    if not torch.cuda.is_available():
        return ME.__version__
    return ME.__version__ + (" (CUDA)" if ME.is_cuda_available() else " (CPU only)")


def _ops() -> dict:
    """Which implementation each sparse op dispatches to, and the compiled extension's build."""
    from . import ops

    info = {}
    for name in ("sparse_depthwise_conv", "sparse_grn"):
        fn = getattr(ops, name, None)
        info[name] = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}" if fn else "missing"
    info["compiled_extension"] = bool(ops.extension_available())
    info["SPARSE_FCMAE_KERNELS"] = os.environ.get("SPARSE_FCMAE_KERNELS")
    info["SPARSE_FCMAE_CHECK_INDICES"] = os.environ.get("SPARSE_FCMAE_CHECK_INDICES")  # a check per call costs time
    for var in ("SPARSE_FCMAE_CUDA_DW", "SPARSE_FCMAE_CUDA_GRN"):  # which CUDA kernels were timed
        info[var] = os.environ.get(var)
    if info["compiled_extension"]:
        from . import _C

        info["cpu_kernels_isa"] = _C.cpu_isa() if hasattr(_C, "cpu_isa") else None
        info["extension_with_cuda"] = bool(getattr(_C, "with_cuda", False))
    return info


def machine_info() -> dict:
    """Hardware, library versions, the kernels in use, backend numerics, load and commit, as of now."""
    import timm

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "timm": timm.__version__,
        "minkowskiengine": _minkowskiengine(),
        "git_commit": git_commit(),
        "ops": _ops(),
        # PyTorch's numerics as set when measured (bench workers also set cudnn.benchmark on CUDA)
        "backends": {
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
        },
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": load_average(),
    }
