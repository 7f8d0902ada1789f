"""Volumes: a 3D sparse FCMAE checkpoint (``model.spatial_dims=3``) <-> the dense 3D ConvNeXt V2
(``models/convnext3d.py``, timm-style keys); ``sparse-fcmae convert IN --to dense3d -o OUT.safetensors``.

Sparse keys (ME layout, ``encoder.``-prefixed in an FCMAE checkpoint): ``downsample_layers.0.{0,1}.*`` (stem),
``downsample_layers.i.0.ln.*``, ``downsample_layers.i.1.kernel (8, Cin, Cout)``, ``stages.i.j.dwconv.kernel
(k^3, C)``, ``.norm.ln.*``, ``.pwconv{1,2}.linear.*``, ``.grn.{gamma,beta} (1, C)``. Both directions are
exact (pure re-layouts), so a round trip is bit-identical.
"""
from __future__ import annotations

import os
import pathlib

import torch

from ..models.base import KERNEL_SIZES
from .rules import ConversionError, convert_state, encoder_state
from .shapes import describe

STEM = "downsample_layers.0.0.weight"


def is_volume_checkpoint(state: dict[str, torch.Tensor]) -> bool:
    """Whether a sparse-layout state dict is a 3D one (its stem is a ``Conv3d``: 5-D weight)."""
    stem = state.get(STEM, state.get("encoder." + STEM))
    return stem is not None and stem.ndim == 5


def describe3d(enc: dict[str, torch.Tensor]) -> tuple[str, int, int]:
    """``(size, in_chans, kernel_size)`` of a 3D sparse encoder state (no ``encoder.`` prefix)."""
    size, in_chans = describe(enc, "sparse", spatial_dims=3)
    taps = enc["stages.0.0.dwconv.kernel"].shape[0]
    k = next((k for k in KERNEL_SIZES if k ** 3 == taps), None)
    if k is None:
        raise ConversionError(f"depthwise kernels have {taps} taps: not 3^3, 5^3 or 7^3")
    return size, in_chans, k


def sparse_to_dense3d(enc: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """3D sparse encoder state -> ``ConvNeXtV2_3D`` state (features; ``head.norm`` weight 1, bias 0, as
    FCMAE has no final norm). The 2D rule table, read with 3D kernels (``rules.convert_state``)."""
    size = describe3d(enc)[0]
    out = convert_state(enc, "sparse", "timm", size, spatial_dims=3)
    dim = enc["downsample_layers.3.1.bias"].shape[-1]
    out["head.norm.weight"], out["head.norm.bias"] = torch.ones(dim), torch.zeros(dim)
    return out


def dense3d_to_sparse(dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``ConvNeXtV2_3D`` state -> 3D sparse encoder state (the inverse of :func:`sparse_to_dense3d`; head dropped)."""
    return convert_state(dense, "timm", "sparse", describe(dense, "timm", spatial_dims=3)[0], spatial_dims=3)


def convert_volume_file(src, out: str | os.PathLike, verify: bool = False, log=print) -> dict:
    """``convert --to dense3d``: a 3D sparse checkpoint -> ``ConvNeXtV2_3D`` weights (.safetensors), atomically."""
    from ..checkpoint import publish, temp_beside
    from .files import read_weights, write_safetensors
    from .verify import check_verified

    out = pathlib.Path(out)
    if out.suffix != ".safetensors":
        raise ConversionError(f"--to dense3d writes safetensors: name the output *.safetensors, got {out}")
    state, _ = read_weights(src)
    if not is_volume_checkpoint(state):
        raise ConversionError(f"{src} is not a 3D sparse checkpoint (model.spatial_dims=3): --to dense3d converts volumes only")
    enc = encoder_state(state) if any(k.startswith("encoder.") for k in state) else state
    size, in_chans, k = describe3d(enc)
    dense = sparse_to_dense3d(enc)
    info = {"source": str(src), "to": "dense3d", "arch": f"convnextv2_{size}", "in_chans": in_chans, "kernel_size": k}
    log(f"[convert] {src} (3D sparse, convnextv2_{size}, in_chans {in_chans}, kernel {k}^3) -> {out} (dense3d)")
    tmp = temp_beside(out, suffix=".partial.safetensors")
    try:
        shapes = [(key, torch.empty(v.shape, dtype=v.dtype, device="meta")) for key, v in dense.items()]
        meta = {"format": "pt", "arch": f"convnextv2_{size}", "in_chans": str(in_chans), "kernel_size": str(k),
                "spatial_dims": "3"}
        write_safetensors(tmp, iter(list(dense.items())), shapes, meta)
        if verify:
            check_verified(info, verify_dense3d(enc, tmp, size, in_chans, k, log))
        publish(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    log(f"[convert] wrote {out}")
    return info


@torch.no_grad()
def verify_dense3d(enc: dict[str, torch.Tensor], path: pathlib.Path, size: str, in_chans: int, k: int, log=print) -> float:
    """Max |sparse - dense| / max |dense| of the stage-4 features at mask ratio 0 (fp32, 2 x Cin x 64^3)."""
    from safetensors.torch import load_file

    from ..models import SparseConvNeXtV2
    from ..models.convnext3d import ConvNeXtV2_3D

    sparse = SparseConvNeXtV2(size, in_chans=in_chans, kernel_size=k, spatial_dims=3).eval()
    sparse.load_state_dict(enc, strict=True)
    dense = ConvNeXtV2_3D(size, in_chans=in_chans, kernel_size=k).eval()
    dense.load_state_dict(load_file(str(path)), strict=True)
    x = torch.randn(2, in_chans, 64, 64, 64, generator=torch.Generator().manual_seed(0))
    a, b = sparse.forward_features(x), dense.forward_features(x)
    err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
    log(f"[convert] verify: max |sparse - dense3d| / max |dense3d| = {err:.3e} (convnextv2_{size}, input "
        f"2x{in_chans}x64^3, fp32, mask ratio 0)")
    return err
