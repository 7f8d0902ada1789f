"""Weight names and shapes between the ConvNeXt V2 layouts: one rule table per layout, read both ways.

Layouts (see DESIGN.md):
- ``sparse``: the official FCMAE MinkowskiEngine encoder (``downsample_layers.i.1.kernel``,
  ``stages.i.j.dwconv.kernel``, ``.pwconv1.linear.weight``, GRN ``(1, C)``), optionally ``encoder.``-prefixed;
- ``dense``: the official dense ConvNeXtV2 (``stages.i.j.dwconv.weight``, GRN ``(1, 1, 1, C)``, ``norm``, ``head``);
- ``timm``: timm ``convnextv2_<size>`` (``stem``, ``stages.i.blocks.j``, ``mlp.grn.weight (C,)``, ``head.norm``,
  ``head.fc``): the hub every conversion passes through;
- ``hf``: Hugging Face transformers ``ConvNextV2Model`` (``embeddings``, ``encoder.stages.i.layers.j``,
  GRN ``(1, 1, 1, C)``, final ``layernorm``).
A rule ``(layout name, timm name, change)`` maps one key each way; ``change`` names a pair of tensor
reshapes (to timm, from timm). Every mapping is per key, so a converter can stream one tensor at a time
(see ``convert_items``). Volumes (``spatial_dims=3``) use the same tables: the sparse layout's keys are the
same, and ``timm`` then means the dense 3D model's timm-style keys (``models/convnext3d.py``: 3D kernels,
``nn.Linear`` MLPs at every size).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

from ..models.sizes import get_size
from ..ops.kernel_layout import (
    conv_kernel_to_weight,
    conv_weight_to_kernel,
    depthwise_kernel_to_weight,
    depthwise_weight_to_kernel,
)

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


# ---- tensor changes: name -> (to timm (v, ctx), from timm (v, ctx)) --------------------------------------
class Ctx(NamedTuple):
    conv_mlp: bool  # timm's small 2D sizes build the MLP from 1x1 convolutions
    dims: int  # spatial dims: 2 (images) or 3 (volumes)


Change = tuple[Callable[[torch.Tensor, Ctx], torch.Tensor], Callable[[torch.Tensor, Ctx], torch.Tensor]]
CHANGES: dict[str | None, Change] = {
    None: (lambda v, c: v, lambda v, c: v),
    # ME (k^D, Cin, Cout) <-> (Cout, Cin, k, ..., k); the weight's own rank gives D on the way back
    "kernel": (lambda v, c: conv_kernel_to_weight(v, c.dims).contiguous(), lambda v, c: conv_weight_to_kernel(v).contiguous()),
    "dw_kernel": (lambda v, c: depthwise_kernel_to_weight(v, c.dims).contiguous(),
                  lambda v, c: depthwise_weight_to_kernel(v).contiguous()),
    "row": (lambda v, c: v.reshape(-1), lambda v, c: v.reshape(1, -1)),  # (1, C) <-> timm (C,)
    "grn4": (lambda v, c: v.reshape(-1), lambda v, c: v.reshape(1, 1, 1, -1)),  # (1, 1, 1, C) <-> (C,)
    # nn.Linear (out, in) <-> timm's MLP, a 1x1 convolution (out, in, 1, 1) for the conv-MLP sizes
    "linear": (lambda v, c: v[:, :, None, None] if c.conv_mlp and v.ndim == 2 else v,
               lambda v, c: v.reshape(v.shape[0], -1)),
}

# ---- the rule tables: {field} placeholders match the same text on both sides ----------------------------
_FIELDS = {"s": "[0-3]", "d": "[123]", "b": r"\d+", "p": "weight|bias", "i": "[01]", "n": "[12]"}
_T = "stages.{s}.blocks.{b}."  # a timm block
RULES: dict[str, tuple[tuple[str, str, str | None], ...]] = {
    "sparse": (
        ("downsample_layers.0.{i}.{p}", "stem.{i}.{p}", None),
        ("downsample_layers.{d}.0.ln.{p}", "stages.{d}.downsample.0.{p}", None),
        ("downsample_layers.{d}.1.kernel", "stages.{d}.downsample.1.weight", "kernel"),
        ("downsample_layers.{d}.1.bias", "stages.{d}.downsample.1.bias", "row"),
        ("stages.{s}.{b}.dwconv.kernel", _T + "conv_dw.weight", "dw_kernel"),
        ("stages.{s}.{b}.dwconv.bias", _T + "conv_dw.bias", "row"),
        ("stages.{s}.{b}.norm.ln.{p}", _T + "norm.{p}", None),
        ("stages.{s}.{b}.pwconv{n}.linear.weight", _T + "mlp.fc{n}.weight", "linear"),
        ("stages.{s}.{b}.pwconv{n}.linear.bias", _T + "mlp.fc{n}.bias", None),
        ("stages.{s}.{b}.grn.gamma", _T + "mlp.grn.weight", "row"),
        ("stages.{s}.{b}.grn.beta", _T + "mlp.grn.bias", "row"),
    ),
    "dense": (
        ("downsample_layers.0.{i}.{p}", "stem.{i}.{p}", None),
        ("downsample_layers.{d}.{i}.{p}", "stages.{d}.downsample.{i}.{p}", None),
        ("stages.{s}.{b}.dwconv.{p}", _T + "conv_dw.{p}", None),
        ("stages.{s}.{b}.norm.{p}", _T + "norm.{p}", None),
        ("stages.{s}.{b}.pwconv{n}.weight", _T + "mlp.fc{n}.weight", "linear"),
        ("stages.{s}.{b}.pwconv{n}.bias", _T + "mlp.fc{n}.bias", None),
        ("stages.{s}.{b}.grn.gamma", _T + "mlp.grn.weight", "grn4"),
        ("stages.{s}.{b}.grn.beta", _T + "mlp.grn.bias", "grn4"),
        ("norm.{p}", "head.norm.{p}", None),
        ("head.{p}", "head.fc.{p}", None),
    ),
    "hf": (
        ("embeddings.patch_embeddings.{p}", "stem.0.{p}", None),
        ("embeddings.layernorm.{p}", "stem.1.{p}", None),
        ("encoder.stages.{d}.downsampling_layer.{i}.{p}", "stages.{d}.downsample.{i}.{p}", None),
        ("encoder.stages.{s}.layers.{b}.dwconv.{p}", _T + "conv_dw.{p}", None),
        ("encoder.stages.{s}.layers.{b}.layernorm.{p}", _T + "norm.{p}", None),
        ("encoder.stages.{s}.layers.{b}.pwconv{n}.weight", _T + "mlp.fc{n}.weight", "linear"),
        ("encoder.stages.{s}.layers.{b}.pwconv{n}.bias", _T + "mlp.fc{n}.bias", None),
        ("encoder.stages.{s}.layers.{b}.grn.{p}", _T + "mlp.grn.{p}", "grn4"),
        ("layernorm.{p}", "head.norm.{p}", None),  # HF's pooler norm (FCMAE has none: see files._timm_extras)
    ),
}
# entries a layout never carries over: read from it (to timm) / written into it (from timm)
DROP_TO_TIMM = {"sparse": FCMAE_DECODER_PREFIXES, "dense": (), "hf": (), "timm": ()}
DROP_FROM_TIMM = {"sparse": ("head.", "norm_pre."), "dense": ("norm_pre.",), "hf": ("head.fc.", "norm_pre."), "timm": ()}
_NAMES = {"sparse": "sparse encoder", "dense": "official dense", "hf": "Hugging Face", "timm": "timm"}


def _regex(template: str) -> re.Pattern:
    out, pos = "", 0
    for m in re.finditer(r"\{(\w)\}", template):
        out += re.escape(template[pos:m.start()]) + f"(?P<{m[1]}>{_FIELDS[m[1]]})"
        pos = m.end()
    return re.compile(out + re.escape(template[pos:]))


# per layout, per direction: (compiled pattern, the other side's template, tensor change)
_COMPILED = {
    layout: {
        "to_timm": [(_regex(a), b, CHANGES[c][0]) for a, b, c in rules],
        "from_timm": [(_regex(b), a, CHANGES[c][1]) for a, b, c in rules],
    }
    for layout, rules in RULES.items()
}


def _apply(layout: str, direction: str, key: str, v: torch.Tensor, ctx: Ctx) -> tuple[str, torch.Tensor]:
    for pattern, template, change in _COMPILED[layout][direction]:
        if m := pattern.fullmatch(key):
            return template.format(**m.groupdict()), change(v, ctx)
    side = layout if direction == "to_timm" else "timm"
    raise ConversionError(f"unexpected {_NAMES[side]} key {key!r}")


def to_timm_key(layout: str, key: str, v: torch.Tensor, ctx: Ctx) -> tuple[str, torch.Tensor] | None:
    """One ``layout`` entry -> timm (``None``: an entry timm has no place for, e.g. the FCMAE decoder)."""
    if layout not in DROP_TO_TIMM:
        raise ValueError(f"unknown layout {layout!r}")
    if layout == "timm":
        return key, v
    if layout == "sparse":
        key = key.removeprefix("encoder.")
    if key.startswith(DROP_TO_TIMM[layout]):
        return None
    return _apply(layout, "to_timm", key, v, ctx)


def from_timm_key(layout: str, key: str, v: torch.Tensor, ctx: Ctx | None = None) -> tuple[str, torch.Tensor] | None:
    """One timm entry -> ``layout`` (``None``: an entry the layout drops, e.g. the head for the sparse encoder)."""
    if layout not in DROP_FROM_TIMM:
        raise ValueError(f"unknown layout {layout!r}")
    if layout == "timm":
        return key, v
    if key.startswith(DROP_FROM_TIMM[layout]):
        return None
    return _apply(layout, "from_timm", key, v, ctx or Ctx(False, 2))


def convert_items(
    state: dict[str, torch.Tensor], src: str, dst: str, size: str, consume: bool = False, spatial_dims: int = 2
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` of ``state`` (layout ``src``) in layout ``dst``, through timm's layout.

    With ``consume=True`` each source entry is removed from ``state`` before its result is yielded,
    so a caller that writes and forgets each result holds about one copy of the weights at a time.
    ``spatial_dims=3``: volumes (the dense 3D model's MLPs are ``nn.Linear`` at every size).
    """
    ctx = Ctx(spatial_dims == 2 and size.removeprefix("convnextv2_") in CONV_MLP_SIZES, spatial_dims)
    for key in list(state):
        v = state.pop(key) if consume else state[key]
        mid = to_timm_key(src, key, v, ctx)
        out = from_timm_key(dst, *mid, ctx) if mid is not None else None
        del v, mid
        if out is not None:
            yield out


def convert_state(state: dict[str, torch.Tensor], src: str, dst: str, size: str,
                  spatial_dims: int = 2) -> dict[str, torch.Tensor]:
    """Dict form of ``convert_items`` (``state`` is left unchanged)."""
    return dict(convert_items(state, src, dst, size, spatial_dims=spatial_dims))


def sparse_to_timm(state: dict[str, torch.Tensor], size: str) -> dict[str, torch.Tensor]:
    """Sparse encoder (official FCMAE ME layout) -> timm ``convnextv2_<size>`` features (no head)."""
    out = convert_state(state, "sparse", "timm", size)
    check_size(out, size.removeprefix("convnextv2_"))
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


def check_size(timm_state: dict[str, torch.Tensor], size: str) -> None:
    """Raise ``ConversionError`` unless a timm state has ``size``'s block counts and stage widths."""
    depths, dims = get_size(size)
    for i, (d, c) in enumerate(zip(depths, dims)):
        blocks = {k.split(".")[3] for k in timm_state if k.startswith(f"stages.{i}.blocks.")}
        if len(blocks) != d:
            raise ConversionError(f"stage {i} has {len(blocks)} blocks, convnextv2_{size} has {d}")
        w = timm_state.get(f"stages.{i}.blocks.0.conv_dw.weight")
        if w is None or w.shape[0] != c:
            raise ConversionError(f"stage {i} width does not match convnextv2_{size} (expected {c} channels)")
