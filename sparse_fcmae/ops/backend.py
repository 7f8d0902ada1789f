"""Which implementation the sparse ops use: the compiled ``sparse_fcmae._C`` kernels by default.

The pure-torch references in ``grn.py`` / ``depthwise.py`` stay as test oracles and as the fallback
when the extension is missing (built without it, or a failed build): the first op call then warns
once. ``SPARSE_FCMAE_KERNELS=0`` forces the references (benchmarks, debugging); it also warns once.
``SPARSE_FCMAE_CUDA_DW=1`` picks the first, scalar CUDA depthwise kernels instead of the vectorised ones
(``2``, the default): to measure the two side by side, or to step around a fault in the new ones.
``SPARSE_FCMAE_CUDA_GRN=1`` likewise picks the CUDA GRN kernels with separate finalize kernels (3 launches
forward, 4 backward) instead of the fused ones (``2``: 2 and 2).
``SPARSE_FCMAE_CHECK_INDICES=1`` checks the tables on every call (``checks.py``).
"""
from __future__ import annotations

import os
import warnings
from types import ModuleType

import torch

ENV_VAR = "SPARSE_FCMAE_KERNELS"
CUDA_DW_VAR = "SPARSE_FCMAE_CUDA_DW"
CUDA_GRN_VAR = "SPARSE_FCMAE_CUDA_GRN"

_ext: ModuleType | None = None
_import_error: str | None = None
_warned = False


def _load() -> ModuleType | None:
    global _ext, _import_error
    if _ext is None and _import_error is None:
        try:
            from .. import _C  # type: ignore[attr-defined]

            _ext = _C
            _apply_cuda_dw_variant(_C)
            _apply_cuda_grn_variant(_C)
        except ImportError as e:  # not built
            _import_error = str(e)
    return _ext


def _apply_cuda_dw_variant(ext: ModuleType) -> None:
    value = os.environ.get(CUDA_DW_VAR, "").strip()
    if not value:
        return
    if value not in ("1", "2", "3"):
        raise ValueError(f"{CUDA_DW_VAR} must be 1 (scalar CUDA depthwise kernels), 2 (vectorised) or 3 "
                         f"(vectorised, 4 rows a thread always), got {value!r}")
    if hasattr(ext, "set_cuda_dw_variant"):  # an older build has only the scalar kernels
        ext.set_cuda_dw_variant(int(value))


def _apply_cuda_grn_variant(ext: ModuleType) -> None:
    value = os.environ.get(CUDA_GRN_VAR, "").strip()
    if not value:
        return
    if value not in ("1", "2"):
        raise ValueError(f"{CUDA_GRN_VAR} must be 1 (separate CUDA GRN finalize kernels) or 2 (fused), got {value!r}")
    if hasattr(ext, "set_cuda_grn_variant"):  # an older build has only the separate kernels
        ext.set_cuda_grn_variant(int(value))


def extension() -> ModuleType | None:
    """The compiled extension module (``None`` if it does not import); no env check, no warning."""
    return _load()


def extension_available() -> bool:
    """Whether ``sparse_fcmae._C`` imports (whatever ``SPARSE_FCMAE_KERNELS`` says)."""
    return _load() is not None


def kernels(tensor=None) -> ModuleType | None:
    """The compiled extension, or ``None`` when the references must be used (warns once).

    ``tensor``: the op's input; a CUDA tensor needs an extension built with CUDA.
    """
    global _warned
    forced_off = os.environ.get(ENV_VAR, "1") == "0"
    ext = None if forced_off else _load()
    why = f"{ENV_VAR}=0" if forced_off else f"the extension sparse_fcmae._C is not built ({_import_error})"
    if ext is not None and tensor is not None and tensor.is_cuda and not getattr(ext, "with_cuda", False):
        ext, why = None, "sparse_fcmae._C was built without CUDA (rebuild with FORCE_CUDA=1)"
    if ext is None and not _warned:
        _warned = True
        warnings.warn(
            f"sparse_fcmae: using the pure-torch reference ops (slow) because {why}",
            RuntimeWarning,
            stacklevel=3,
        )
    return ext


def reset_warning() -> None:
    """Forget that the fallback warning was shown (for tests)."""
    global _warned
    _warned = False


def needs_float32(tensor) -> bool:
    """The CPU kernels take float32/float64: half and bfloat16 CPU features (CPU autocast) are
    computed in float32 and cast back, as autocast does for ops without low-precision kernels."""
    return (not tensor.is_cuda) and tensor.dtype in (torch.float16, torch.bfloat16)
