"""Weight mappings between the ConvNeXt V2 layouts, all through timm's layout.

Layouts (see DESIGN.md):
- ``sparse``: the official FCMAE MinkowskiEngine encoder (``downsample_layers.i.1.kernel``,
  ``stages.i.j.dwconv.kernel``, ``.pwconv1.linear.weight``, GRN ``(1, C)``), optionally ``encoder.``-prefixed;
- ``dense``: the official dense ConvNeXtV2 (``stages.i.j.dwconv.weight``, GRN ``(1, 1, 1, C)``, ``norm``, ``head``);
- ``timm``: timm ``convnextv2_<size>`` (``stem``, ``stages.i.blocks.j``, ``mlp.grn.weight (C,)``, ``head.norm``,
  ``head.fc``);
- ``hf`` (write-only): Hugging Face transformers ``ConvNextV2Model`` (``embeddings``, ``encoder.stages.i.layers.j``,
  GRN ``(1, 1, 1, C)``, final ``layernorm``); see ``HF_FROM_TIMM``.
Every mapping is per key, so a converter can stream one tensor at a time (see ``convert_items``).
"""
from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from .kernel_layout import (
    conv_kernel_to_weight,
    conv_weight_to_kernel,
    depthwise_kernel_to_weight,
    depthwise_weight_to_kernel,
)
from .models.sizes import SIZES, get_size

# timm builds the MLP of the small sizes with 1x1 convolutions (weights (out, in, 1, 1)).
CONV_MLP_SIZES = {"atto", "femto", "pico", "nano"}
LAYOUTS = ("sparse", "dense", "timm")
# FCMAE parts that a dense model does not have (the decoder side of the FCMAE checkpoint).
FCMAE_DECODER_PREFIXES = ("proj.", "mask_token", "decoder.", "pred.")


class ConversionError(ValueError):
    pass


def encoder_state(state: dict[str, torch.Tensor], prefix: str = "encoder.") -> dict[str, torch.Tensor]:
    """The encoder's entries of an FCMAE state dict, prefix removed (a bare encoder dict passes through)."""
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


# ---------------------------------------------------------------------------------------------
# Per-key mappings. Each returns (new key, tensor), or None for an entry the target drops.
# ---------------------------------------------------------------------------------------------
def _mlp_weight_to_timm(v: torch.Tensor, conv_mlp: bool) -> torch.Tensor:
    return v[:, :, None, None] if conv_mlp else v


def sparse_key_to_timm(key: str, v: torch.Tensor, conv_mlp: bool) -> tuple[str, torch.Tensor] | None:
    """One sparse-layout encoder entry -> timm (``encoder.`` prefix allowed; FCMAE decoder entries -> None)."""
    key = key.removeprefix("encoder.")
    if key.startswith(FCMAE_DECODER_PREFIXES):
        return None
    if m := re.fullmatch(r"downsample_layers\.0\.([01])\.(weight|bias)", key):
        return f"stem.{m[1]}.{m[2]}", v
    if m := re.fullmatch(r"downsample_layers\.([123])\.0\.ln\.(weight|bias)", key):
        return f"stages.{m[1]}.downsample.0.{m[2]}", v
    if m := re.fullmatch(r"downsample_layers\.([123])\.1\.kernel", key):
        return f"stages.{m[1]}.downsample.1.weight", conv_kernel_to_weight(v)
    if m := re.fullmatch(r"downsample_layers\.([123])\.1\.bias", key):
        return f"stages.{m[1]}.downsample.1.bias", v.reshape(-1)
    if m := re.fullmatch(r"stages\.([0-3])\.(\d+)\.(.+)", key):
        blk, rest = f"stages.{m[1]}.blocks.{m[2]}.", m[3]
        if rest == "dwconv.kernel":
            return blk + "conv_dw.weight", depthwise_kernel_to_weight(v)
        if rest == "dwconv.bias":
            return blk + "conv_dw.bias", v.reshape(-1)
        if mm := re.fullmatch(r"norm\.ln\.(weight|bias)", rest):
            return blk + f"norm.{mm[1]}", v
        if mm := re.fullmatch(r"pwconv([12])\.linear\.(weight|bias)", rest):
            return blk + f"mlp.fc{mm[1]}.{mm[2]}", _mlp_weight_to_timm(v, conv_mlp) if mm[2] == "weight" else v
        if rest in ("grn.gamma", "grn.beta"):
            return blk + ("mlp.grn.weight" if rest == "grn.gamma" else "mlp.grn.bias"), v.reshape(-1)
    raise ConversionError(f"unexpected sparse encoder key {key!r}")


def timm_key_to_sparse(key: str, v: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """One timm entry -> sparse layout (``head.*`` and ``norm_pre.*`` -> None: the encoder has no head)."""
    if key.startswith(("head.", "norm_pre.")):
        return None
    if m := re.fullmatch(r"stem\.([01])\.(weight|bias)", key):
        return f"downsample_layers.0.{m[1]}.{m[2]}", v
    if m := re.fullmatch(r"stages\.([123])\.downsample\.0\.(weight|bias)", key):
        return f"downsample_layers.{m[1]}.0.ln.{m[2]}", v
    if m := re.fullmatch(r"stages\.([123])\.downsample\.1\.weight", key):
        return f"downsample_layers.{m[1]}.1.kernel", conv_weight_to_kernel(v)
    if m := re.fullmatch(r"stages\.([123])\.downsample\.1\.bias", key):
        return f"downsample_layers.{m[1]}.1.bias", v.reshape(1, -1)
    if m := re.fullmatch(r"stages\.([0-3])\.blocks\.(\d+)\.(.+)", key):
        blk, rest = f"stages.{m[1]}.{m[2]}.", m[3]
        if rest == "conv_dw.weight":
            return blk + "dwconv.kernel", depthwise_weight_to_kernel(v)
        if rest == "conv_dw.bias":
            return blk + "dwconv.bias", v.reshape(1, -1)
        if mm := re.fullmatch(r"norm\.(weight|bias)", rest):
            return blk + f"norm.ln.{mm[1]}", v
        if mm := re.fullmatch(r"mlp\.fc([12])\.(weight|bias)", rest):
            return blk + f"pwconv{mm[1]}.linear.{mm[2]}", v.reshape(v.shape[0], -1) if mm[2] == "weight" else v
        if rest in ("mlp.grn.weight", "mlp.grn.bias"):
            return blk + ("grn.gamma" if rest.endswith("weight") else "grn.beta"), v.reshape(1, -1)
    raise ConversionError(f"unexpected timm key {key!r}")


def dense_key_to_timm(key: str, v: torch.Tensor, conv_mlp: bool) -> tuple[str, torch.Tensor] | None:
    """One official dense ConvNeXtV2 entry -> timm (``norm`` -> ``head.norm``, ``head`` -> ``head.fc``)."""
    if m := re.fullmatch(r"downsample_layers\.0\.([01])\.(weight|bias)", key):
        return f"stem.{m[1]}.{m[2]}", v
    if m := re.fullmatch(r"downsample_layers\.([123])\.([01])\.(weight|bias)", key):
        return f"stages.{m[1]}.downsample.{m[2]}.{m[3]}", v
    if m := re.fullmatch(r"stages\.([0-3])\.(\d+)\.(.+)", key):
        blk, rest = f"stages.{m[1]}.blocks.{m[2]}.", m[3]
        if mm := re.fullmatch(r"dwconv\.(weight|bias)", rest):
            return blk + f"conv_dw.{mm[1]}", v
        if mm := re.fullmatch(r"norm\.(weight|bias)", rest):
            return blk + f"norm.{mm[1]}", v
        if mm := re.fullmatch(r"pwconv([12])\.(weight|bias)", rest):
            return blk + f"mlp.fc{mm[1]}.{mm[2]}", _mlp_weight_to_timm(v, conv_mlp) if mm[2] == "weight" else v
        if rest in ("grn.gamma", "grn.beta"):
            return blk + ("mlp.grn.weight" if rest == "grn.gamma" else "mlp.grn.bias"), v.reshape(-1)
    if m := re.fullmatch(r"norm\.(weight|bias)", key):
        return f"head.norm.{m[1]}", v
    if m := re.fullmatch(r"head\.(weight|bias)", key):
        return f"head.fc.{m[1]}", v
    raise ConversionError(f"unexpected official dense key {key!r}")


def timm_key_to_dense(key: str, v: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """One timm entry -> official dense layout."""
    if key.startswith("norm_pre."):
        return None
    if m := re.fullmatch(r"stem\.([01])\.(weight|bias)", key):
        return f"downsample_layers.0.{m[1]}.{m[2]}", v
    if m := re.fullmatch(r"stages\.([123])\.downsample\.([01])\.(weight|bias)", key):
        return f"downsample_layers.{m[1]}.{m[2]}.{m[3]}", v
    if m := re.fullmatch(r"stages\.([0-3])\.blocks\.(\d+)\.(.+)", key):
        blk, rest = f"stages.{m[1]}.{m[2]}.", m[3]
        if mm := re.fullmatch(r"conv_dw\.(weight|bias)", rest):
            return blk + f"dwconv.{mm[1]}", v
        if mm := re.fullmatch(r"norm\.(weight|bias)", rest):
            return blk + f"norm.{mm[1]}", v
        if mm := re.fullmatch(r"mlp\.fc([12])\.(weight|bias)", rest):
            return blk + f"pwconv{mm[1]}.{mm[2]}", v.reshape(v.shape[0], -1) if mm[2] == "weight" else v
        if rest in ("mlp.grn.weight", "mlp.grn.bias"):
            return blk + ("grn.gamma" if rest.endswith("weight") else "grn.beta"), v.reshape(1, 1, 1, -1)
    if m := re.fullmatch(r"head\.norm\.(weight|bias)", key):
        return f"norm.{m[1]}", v
    if m := re.fullmatch(r"head\.fc\.(weight|bias)", key):
        return f"head.{m[1]}", v
    raise ConversionError(f"unexpected timm key {key!r}")


# timm -> Hugging Face ``ConvNextV2Model``: one row per key, ``(timm pattern, HF name, shape change)``.
# ``None`` as the HF name drops the entry (the classifier: ConvNextV2Model is features + pooler only).
# Shape changes: "linear" flattens timm's 1x1-conv MLP weights (out, in, 1, 1) to nn.Linear (out, in)
# (Linear-MLP sizes pass unchanged); "grn" makes timm's GRN (C,) HF's (1, 1, 1, C).
_B = r"stages\.([0-3])\.blocks\.(\d+)\."
_HB = r"encoder.stages.\1.layers.\2."
HF_FROM_TIMM: tuple[tuple[str, str | None, str | None], ...] = (
    (r"stem\.0\.(weight|bias)", r"embeddings.patch_embeddings.\1", None),
    (r"stem\.1\.(weight|bias)", r"embeddings.layernorm.\1", None),
    (r"stages\.([123])\.downsample\.([01])\.(weight|bias)", r"encoder.stages.\1.downsampling_layer.\2.\3", None),
    (_B + r"conv_dw\.(weight|bias)", _HB + r"dwconv.\3", None),
    (_B + r"norm\.(weight|bias)", _HB + r"layernorm.\3", None),
    (_B + r"mlp\.fc([12])\.weight", _HB + r"pwconv\3.weight", "linear"),
    (_B + r"mlp\.fc([12])\.bias", _HB + r"pwconv\3.bias", None),
    (_B + r"mlp\.grn\.(weight|bias)", _HB + r"grn.\3", "grn"),
    (r"head\.norm\.(weight|bias)", r"layernorm.\1", None),  # HF's pooler norm (FCMAE has none: see convert_cli)
    (r"head\.fc\.(weight|bias)", None, None),
    (r"norm_pre\.(weight|bias)", None, None),
)


def timm_key_to_hf(key: str, v: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """One timm entry -> Hugging Face ``ConvNextV2Model`` (the classifier -> None), by ``HF_FROM_TIMM``."""
    for pattern, name, change in HF_FROM_TIMM:
        if m := re.fullmatch(pattern, key):
            if name is None:
                return None
            if change == "linear":
                v = v.reshape(v.shape[0], -1)
            elif change == "grn":
                v = v.reshape(1, 1, 1, -1)
            return m.expand(name), v
    raise ConversionError(f"unexpected timm key {key!r}")


def to_timm_key(layout: str, key: str, v: torch.Tensor, conv_mlp: bool) -> tuple[str, torch.Tensor] | None:
    if layout == "sparse":
        return sparse_key_to_timm(key, v, conv_mlp)
    if layout == "dense":
        return dense_key_to_timm(key, v, conv_mlp)
    if layout == "timm":
        return key, v
    raise ValueError(f"unknown layout {layout!r}")


def from_timm_key(layout: str, key: str, v: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    if layout == "sparse":
        return timm_key_to_sparse(key, v)
    if layout == "dense":
        return timm_key_to_dense(key, v)
    if layout == "hf":
        return timm_key_to_hf(key, v)
    if layout == "timm":
        return key, v
    raise ValueError(f"unknown layout {layout!r}")


def convert_items(
    state: dict[str, torch.Tensor], src: str, dst: str, size: str, consume: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` of ``state`` (layout ``src``) in layout ``dst``, through timm's layout.

    With ``consume=True`` each source entry is removed from ``state`` before its result is yielded,
    so a caller that writes and forgets each result holds about one copy of the weights at a time.
    """
    conv_mlp = size.removeprefix("convnextv2_") in CONV_MLP_SIZES
    for key in list(state):
        v = state.pop(key) if consume else state[key]
        mid = to_timm_key(src, key, v, conv_mlp)
        out = from_timm_key(dst, *mid) if mid is not None else None
        del v, mid
        if out is not None:
            yield out


def convert_state(state: dict[str, torch.Tensor], src: str, dst: str, size: str) -> dict[str, torch.Tensor]:
    """Dict form of ``convert_items`` (``state`` is left unchanged)."""
    return dict(convert_items(state, src, dst, size))


def sparse_to_timm(state: dict[str, torch.Tensor], size: str) -> dict[str, torch.Tensor]:
    """Sparse encoder (official FCMAE ME layout) -> timm ``convnextv2_<size>`` features (no head)."""
    out = convert_state(state, "sparse", "timm", size)
    _check_size(out, size.removeprefix("convnextv2_"))
    return out


def timm_to_sparse(state: dict[str, torch.Tensor], size: str) -> dict[str, torch.Tensor]:
    """timm ``convnextv2_<size>`` -> sparse encoder layout (head and final norm dropped)."""
    return convert_state(state, "timm", "sparse", size)


def dense_to_timm(state: dict[str, torch.Tensor], size: str) -> dict[str, torch.Tensor]:
    """Official dense ConvNeXtV2 -> timm."""
    return convert_state(state, "dense", "timm", size)


def timm_to_dense(state: dict[str, torch.Tensor], size: str) -> dict[str, torch.Tensor]:
    """timm -> official dense ConvNeXtV2."""
    return convert_state(state, "timm", "dense", size)


# ---------------------------------------------------------------------------------------------
# Detection and checks
# ---------------------------------------------------------------------------------------------
def detect_layout(keys) -> str:
    """``sparse`` / ``dense`` / ``timm`` from the key names alone."""
    keys = [k.removeprefix("encoder.") for k in keys]
    if any(k.endswith(".dwconv.kernel") or k.endswith(".1.kernel") for k in keys):
        return "sparse"
    if any(re.fullmatch(r"stages\.\d\.\d+\.dwconv\.weight", k) for k in keys):
        return "dense"
    if any(re.fullmatch(r"stages\.\d\.blocks\.\d+\.conv_dw\.weight", k) for k in keys):
        return "timm"
    raise ConversionError("not a ConvNeXt V2 checkpoint (no sparse, official dense or timm ConvNeXt V2 keys found)")


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


def describe(state: dict[str, torch.Tensor], layout: str) -> tuple[str, int]:
    """``(size, in_chans)`` of a checkpoint from its block counts and widths (shapes only, nothing copied)."""
    meta = meta_state(state)
    stem_key = {"sparse": "downsample_layers.0.0.weight", "dense": "downsample_layers.0.0.weight", "timm": "stem.0.weight"}[layout]
    stem = meta.get(stem_key, meta.get("encoder." + stem_key))
    if stem is None or stem.ndim != 4:
        raise ConversionError(f"missing key {stem_key} (the stem convolution)")
    depths, dims = [], []
    for i in range(4):
        pat = {"sparse": rf"(encoder\.)?stages\.{i}\.(\d+)\.dwconv\.kernel", "dense": rf"stages\.{i}\.(\d+)\.dwconv\.weight",
               "timm": rf"stages\.{i}\.blocks\.(\d+)\.conv_dw\.weight"}[layout]
        hits = [(m, v) for k, v in meta.items() if (m := re.fullmatch(pat, k))]
        depths.append(len(hits))
        dims.append(hits[0][1].shape[-1] if layout == "sparse" and hits else hits[0][1].shape[0] if hits else 0)
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


def _check_size(timm_state: dict[str, torch.Tensor], size: str) -> None:
    depths, dims = get_size(size)
    for i, (d, c) in enumerate(zip(depths, dims)):
        blocks = {k.split(".")[3] for k in timm_state if k.startswith(f"stages.{i}.blocks.")}
        if len(blocks) != d:
            raise ConversionError(f"stage {i} has {len(blocks)} blocks, convnextv2_{size} has {d}")
        w = timm_state.get(f"stages.{i}.blocks.0.conv_dw.weight")
        if w is None or w.shape[0] != c:
            raise ConversionError(f"stage {i} width does not match convnextv2_{size} (expected {c} channels)")
