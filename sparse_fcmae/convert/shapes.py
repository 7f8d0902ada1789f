"""What a checkpoint is, from its key names and shapes alone: layout, size, input channels, completeness."""
from __future__ import annotations

import re

import torch

from ..models.sizes import SIZES, get_size
from .rules import CONV_MLP_SIZES, ConversionError, convert_items

# the stem convolution and one block's depthwise weight of each layout (sparse keys may carry ``encoder.``)
_STEM = {"sparse": "downsample_layers.0.0.weight", "dense": "downsample_layers.0.0.weight", "timm": "stem.0.weight",
         "hf": "embeddings.patch_embeddings.weight"}
_DWCONV = {"sparse": r"(?:encoder\.)?stages\.{i}\.(\d+)\.dwconv\.kernel", "dense": r"stages\.{i}\.(\d+)\.dwconv\.weight",
           "timm": r"stages\.{i}\.blocks\.(\d+)\.conv_dw\.weight", "hf": r"encoder\.stages\.{i}\.layers\.(\d+)\.dwconv\.weight"}


def detect_layout(keys) -> str:
    """``sparse`` / ``dense`` / ``timm`` / ``hf`` from the key names alone."""
    keys = [k.removeprefix("encoder.") for k in keys]
    if any(k.endswith(".dwconv.kernel") or k.endswith(".1.kernel") for k in keys):
        return "sparse"
    if any(re.fullmatch(r"stages\.\d\.\d+\.dwconv\.weight", k) for k in keys):
        return "dense"
    if any(re.fullmatch(r"stages\.\d\.blocks\.\d+\.conv_dw\.weight", k) for k in keys):
        return "timm"
    if any(re.fullmatch(r"stages\.\d\.layers\.\d+\.dwconv\.weight", k) for k in keys):  # "encoder." removed above
        return "hf"
    raise ConversionError("not a ConvNeXt V2 checkpoint (no sparse, official dense, timm or Hugging Face "
                          "ConvNeXt V2 keys found)")


def timm_shapes(size: str, in_chans: int = 3) -> dict[str, tuple[int, ...]]:
    """Every key and shape of timm ``convnextv2_<size>`` features, head excluded, written from the size table."""
    size = size.removeprefix("convnextv2_")
    depths, dims = get_size(size)
    conv_mlp = size in CONV_MLP_SIZES
    out: dict[str, tuple[int, ...]] = {
        "stem.0.weight": (dims[0], in_chans, 4, 4), "stem.0.bias": (dims[0],),
        "stem.1.weight": (dims[0],), "stem.1.bias": (dims[0],),
    }
    for i, (d, c) in enumerate(zip(depths, dims)):
        if i > 0:
            p = f"stages.{i}.downsample."
            out.update({p + "0.weight": (dims[i - 1],), p + "0.bias": (dims[i - 1],),
                        p + "1.weight": (c, dims[i - 1], 2, 2), p + "1.bias": (c,)})
        for j in range(d):
            p = f"stages.{i}.blocks.{j}."
            tail = (1, 1) if conv_mlp else ()
            out.update({
                p + "conv_dw.weight": (c, 1, 7, 7), p + "conv_dw.bias": (c,),
                p + "norm.weight": (c,), p + "norm.bias": (c,),
                p + "mlp.fc1.weight": (4 * c, c, *tail), p + "mlp.fc1.bias": (4 * c,),
                p + "mlp.grn.weight": (4 * c,), p + "mlp.grn.bias": (4 * c,),
                p + "mlp.fc2.weight": (c, 4 * c, *tail), p + "mlp.fc2.bias": (c,),
            })
    return out


def meta_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Shape-and-dtype-only copies (``meta`` device): plan a conversion without touching the data."""
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items() if isinstance(v, torch.Tensor)}


def describe(state: dict[str, torch.Tensor], layout: str, spatial_dims: int = 2) -> tuple[str, int]:
    """``(size, in_chans)`` of a checkpoint from its block counts and widths (shapes only, nothing copied);
    ``spatial_dims=3``: a volume model's (its stem a ``Conv3d``)."""
    meta = meta_state(state)
    stem_key = _STEM[layout]
    stem = meta.get(stem_key, meta.get("encoder." + stem_key))
    if stem is None or stem.ndim != 2 + spatial_dims:
        raise ConversionError(f"missing key {stem_key} (the stem convolution)")
    depths, dims = [], []
    for i in range(4):
        pat = _DWCONV[layout].replace("{i}", str(i))
        hits = [v for k, v in meta.items() if re.fullmatch(pat, k)]
        depths.append(len(hits))
        # the ME depthwise kernel is (k**D, C); every dense layout's weight is (C, 1, k, ..., k)
        dims.append((hits[0].shape[-1] if layout == "sparse" else hits[0].shape[0]) if hits else 0)
    for name, (d, c) in SIZES.items():
        if tuple(depths) == d and tuple(dims) == c:
            return name, int(stem.shape[1])
    raise ConversionError(f"no ConvNeXt V2 size has depths {tuple(depths)} and widths {tuple(dims)}")


def check_complete(state: dict[str, torch.Tensor], layout: str, size: str, in_chans: int) -> None:
    """Raise ``ConversionError`` unless ``state`` holds every encoder weight of ``size`` with the right shape."""
    got = {k: tuple(v.shape) for k, v in convert_items(meta_state(state), layout, "timm", size) if not k.startswith("head.")}
    want = timm_shapes(size, in_chans)
    missing = sorted(set(want) - set(got))
    if missing:
        raise ConversionError(f"{len(missing)} missing key(s) for convnextv2_{size.removeprefix('convnextv2_')}, "
                              f"first {missing[0]} (timm name)")
    extra = sorted(set(got) - set(want))
    if extra:
        raise ConversionError(f"unexpected key {extra[0]} (timm name)")
    for k, shape in want.items():
        if got[k] != shape:
            raise ConversionError(f"{k} (timm name) has shape {got[k]}, convnextv2_{size} needs {shape}")
