"""Weight mapping between the sparse FCMAE encoder (official FCMAE layout) and timm ConvNeXt V2."""
from __future__ import annotations

import re

import torch

from .kernel_layout import (
    conv_kernel_to_weight,
    conv_weight_to_kernel,
    depthwise_kernel_to_weight,
    depthwise_weight_to_kernel,
)
from .models.sizes import get_size

# timm builds the MLP of the small sizes with 1x1 convolutions (weights (out, in, 1, 1)).
CONV_MLP_SIZES = {"atto", "femto", "pico", "nano"}


class ConversionError(ValueError):
    pass


def encoder_state(state: dict[str, torch.Tensor], prefix: str = "encoder.") -> dict[str, torch.Tensor]:
    """The encoder's entries of an FCMAE state dict, prefix removed (a bare encoder dict passes through)."""
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def sparse_to_timm(state: dict[str, torch.Tensor], size: str) -> dict[str, torch.Tensor]:
    """Sparse encoder (official FCMAE ME layout) -> timm ``convnextv2_<size>`` features (no head)."""
    size = size.removeprefix("convnextv2_")
    conv_mlp = size in CONV_MLP_SIZES
    out: dict[str, torch.Tensor] = {}
    for key, v in encoder_state(state).items():
        if m := re.fullmatch(r"downsample_layers\.0\.([01])\.(weight|bias)", key):
            out[f"stem.{m[1]}.{m[2]}"] = v
        elif m := re.fullmatch(r"downsample_layers\.(\d)\.0\.ln\.(weight|bias)", key):
            out[f"stages.{m[1]}.downsample.0.{m[2]}"] = v
        elif m := re.fullmatch(r"downsample_layers\.(\d)\.1\.kernel", key):
            out[f"stages.{m[1]}.downsample.1.weight"] = conv_kernel_to_weight(v)
        elif m := re.fullmatch(r"downsample_layers\.(\d)\.1\.bias", key):
            out[f"stages.{m[1]}.downsample.1.bias"] = v.reshape(-1)
        elif m := re.fullmatch(r"stages\.(\d)\.(\d+)\.(.+)", key):
            blk = f"stages.{m[1]}.blocks.{m[2]}."
            rest = m[3]
            if rest == "dwconv.kernel":
                out[blk + "conv_dw.weight"] = depthwise_kernel_to_weight(v)
            elif rest == "dwconv.bias":
                out[blk + "conv_dw.bias"] = v.reshape(-1)
            elif rest in ("norm.ln.weight", "norm.ln.bias"):
                out[blk + "norm." + rest.split(".")[-1]] = v
            elif mm := re.fullmatch(r"pwconv([12])\.linear\.(weight|bias)", rest):
                t = v[:, :, None, None] if (conv_mlp and mm[2] == "weight") else v
                out[blk + f"mlp.fc{mm[1]}.{mm[2]}"] = t
            elif rest in ("grn.gamma", "grn.beta"):
                out[blk + ("mlp.grn.weight" if rest == "grn.gamma" else "mlp.grn.bias")] = v.reshape(-1)
            else:
                raise ConversionError(f"unexpected sparse encoder key {key!r}")
        else:
            raise ConversionError(f"unexpected sparse encoder key {key!r}")
    _check_size(out, size)
    return out


def timm_to_sparse(state: dict[str, torch.Tensor], size: str) -> dict[str, torch.Tensor]:
    """timm ``convnextv2_<size>`` -> sparse encoder layout (head and final norm dropped)."""
    out: dict[str, torch.Tensor] = {}
    for key, v in state.items():
        if key.startswith("head.") or key.startswith("norm_pre."):
            continue
        if m := re.fullmatch(r"stem\.([01])\.(weight|bias)", key):
            out[f"downsample_layers.0.{m[1]}.{m[2]}"] = v
        elif m := re.fullmatch(r"stages\.(\d)\.downsample\.0\.(weight|bias)", key):
            out[f"downsample_layers.{m[1]}.0.ln.{m[2]}"] = v
        elif m := re.fullmatch(r"stages\.(\d)\.downsample\.1\.weight", key):
            out[f"downsample_layers.{m[1]}.1.kernel"] = conv_weight_to_kernel(v)
        elif m := re.fullmatch(r"stages\.(\d)\.downsample\.1\.bias", key):
            out[f"downsample_layers.{m[1]}.1.bias"] = v.reshape(1, -1)
        elif m := re.fullmatch(r"stages\.(\d)\.blocks\.(\d+)\.(.+)", key):
            blk = f"stages.{m[1]}.{m[2]}."
            rest = m[3]
            if rest == "conv_dw.weight":
                out[blk + "dwconv.kernel"] = depthwise_weight_to_kernel(v)
            elif rest == "conv_dw.bias":
                out[blk + "dwconv.bias"] = v.reshape(1, -1)
            elif rest in ("norm.weight", "norm.bias"):
                out[blk + "norm.ln." + rest.split(".")[-1]] = v
            elif mm := re.fullmatch(r"mlp\.fc([12])\.(weight|bias)", rest):
                out[blk + f"pwconv{mm[1]}.linear.{mm[2]}"] = v.reshape(v.shape[0], -1) if mm[2] == "weight" else v
            elif rest in ("mlp.grn.weight", "mlp.grn.bias"):
                out[blk + ("grn.gamma" if rest.endswith("weight") else "grn.beta")] = v.reshape(1, -1)
            else:
                raise ConversionError(f"unexpected timm key {key!r}")
        else:
            raise ConversionError(f"unexpected timm key {key!r}")
    return out


def _check_size(timm_state: dict[str, torch.Tensor], size: str) -> None:
    depths, dims = get_size(size)
    for i, (d, c) in enumerate(zip(depths, dims)):
        blocks = {k.split(".")[3] for k in timm_state if k.startswith(f"stages.{i}.blocks.")}
        if len(blocks) != d:
            raise ConversionError(f"stage {i} has {len(blocks)} blocks, convnextv2_{size} has {d}")
        w = timm_state.get(f"stages.{i}.blocks.0.conv_dw.weight")
        if w is None or w.shape[0] != c:
            raise ConversionError(f"stage {i} width does not match convnextv2_{size} (expected {c} channels)")
