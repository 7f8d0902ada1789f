"""``sparse-fcmae convert``: read any ConvNeXt V2 checkpoint, write timm / official dense / sparse-fcmae weights,
or a Hugging Face transformers ``ConvNextV2Model`` folder (config.json + model.safetensors; see ``hf``).

It streams: each tensor is converted, written and dropped before the next one, so converting holds about one
copy of the weights. ``load_weights`` is the one way the rest of the package reads a checkpoint of any format.
"""
from __future__ import annotations

import json
import os
import pathlib

import torch

from ..checkpoint import CheckpointError, load_checkpoint, publish, temp_beside
from ..models.sizes import SIZES
from .dense3d import is_volume_checkpoint
from .rules import ConversionError, convert_items
from .shapes import check_complete, describe, detect_layout, meta_state

SOURCES = {"sparse-fcmae": "sparse", "official-fcmae": "sparse", "official-dense": "dense", "timm": "timm", "hf": "hf"}
TARGETS = {"timm": "timm", "official": "dense", "sparse-fcmae": "sparse", "hf": "hf", "dense3d": "dense3d"}
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
HF_CONFIG, HF_WEIGHTS = "config.json", "model.safetensors"
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state dict, whole checkpoint without its state)`` from a torch checkpoint or a .safetensors file."""
    path = pathlib.Path(path)
    if path.is_dir() and (path / HF_WEIGHTS).is_file():  # a Hugging Face folder (e.g. one `--to hf` wrote)
        path = path / HF_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and not head.startswith(b"PK"):
        try:
            from safetensors.torch import load_file

            return load_file(str(path)), {}
        except Exception as e:
            raise CheckpointError(f"cannot read safetensors file {path}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):  # zip (torch.save) or legacy pickle
        raise CheckpointError(f"{path} is neither a PyTorch checkpoint nor a safetensors file")
    obj = load_checkpoint(path)
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                rest = {k: v for k, v in obj.items() if k not in (key, "optimizer", "scaler")}
                obj.pop("optimizer", None)  # AdamW moments: twice the weights, never needed here
                return _tensors_only(obj[key], path), rest
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj, {}
    raise ConversionError(f"{path} holds no state dict (expected a dict of tensors or a 'model' entry)")


def _tensors_only(state: dict, path) -> dict[str, torch.Tensor]:
    if not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ConversionError(f"{path}: the state dict is empty or holds non-tensor entries")
    return state


def source_format(state: dict, extra: dict, requested: str = "auto") -> tuple[str, str]:
    """``(format name, layout)``; ``requested`` (a ``--from`` value) must agree with the keys."""
    layout = detect_layout(state.keys())
    if layout == "sparse" and is_volume_checkpoint(state):
        raise ConversionError("this is a 3D (volume) checkpoint: convert it with --to dense3d (a .safetensors output)")
    if layout == "sparse":
        fmt = "sparse-fcmae" if isinstance(extra.get("config"), dict) else "official-fcmae"
    else:
        fmt = {"dense": "official-dense", "timm": "timm", "hf": "hf"}[layout]
    if requested != "auto":
        if requested not in SOURCES:
            raise ConversionError(f"--from must be auto or one of {', '.join(SOURCES)}, got {requested!r}")
        if SOURCES[requested] != layout:
            raise ConversionError(f"--from {requested} does not match the file, which looks like {fmt}")
        fmt = requested
    return fmt, layout


def resolve_arch(state: dict, layout: str, arch: str | None) -> tuple[str, int]:
    size, in_chans = describe(state, layout)
    if arch:
        want = arch.removeprefix("convnextv2_")
        if want not in SIZES:
            raise ConversionError(f"unknown --arch {arch!r}; choose convnextv2_{{{','.join(SIZES)}}}")
        if want != size:
            raise ConversionError(f"--arch {arch} does not match the checkpoint, which is convnextv2_{size}")
    check_complete(state, layout, size, in_chans)
    return size, in_chans


def load_weights(path: str | os.PathLike, dst: str, arch: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Any checkpoint ``sparse-fcmae convert`` reads, checked whole, in layout ``dst`` (sparse, dense, timm, hf).

    Returns ``(state, info)``; ``info``: ``format`` (as ``--from`` names it), ``layout`` (the file's), ``size``,
    ``in_chans`` and ``source`` (the file's own state, for entries outside the encoder such as a decoder)."""
    state, extra = read_weights(path)
    fmt, layout = source_format(state, extra)
    size, in_chans = resolve_arch(state, layout, arch)
    out = dict(convert_items(state, layout, dst, size))  # through timm even when layouts agree: encoder keys only
    return out, {"format": fmt, "layout": layout, "size": size, "in_chans": in_chans, "source": state}


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def write_safetensors(path: pathlib.Path, items, shapes: list[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> None:
    """Stream ``items`` ((key, tensor), in the order of ``shapes``, meta tensors) into a safetensors file.

    The header needs every shape first, so it is planned from meta tensors; then each tensor is written
    and dropped, never building the whole file in memory.
    """
    header: dict = {"__metadata__": metadata}
    offset = 0
    for key, t in shapes:
        n = t.numel() * t.element_size()
        header[key] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes, as the format recommends
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for (key, t), (want_key, meta) in zip(items, shapes, strict=True):
            if key != want_key or t.shape != meta.shape:
                raise RuntimeError(f"internal: streamed {key} differs from the planned {want_key}")
            f.write(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del t
        f.flush()
        os.fsync(f.fileno())


def _timm_extras(size: str, keys) -> list[tuple[str, torch.Tensor]]:
    """A complete timm features state: FCMAE has no final norm, so write timm's fresh one (weight 1, bias 0)."""
    dim = SIZES[size][1][-1]
    if "head.norm.weight" in keys:
        return []
    return [("head.norm.weight", torch.ones(dim)), ("head.norm.bias", torch.zeros(dim))]


def convert_file(src: str | os.PathLike, out: str | os.PathLike, src_format: str = "auto", target: str = "timm",
                 arch: str | None = None, verify: bool = False, log=print) -> dict:
    """Convert ``src`` into ``out`` (written atomically; nothing is left behind on error)."""
    if target not in TARGETS:
        raise ConversionError(f"--to must be one of {', '.join(TARGETS)}, got {target!r}")
    out = pathlib.Path(out)
    if target == "dense3d":  # volumes: their own mapping and model (dense3d.py)
        from .dense3d import convert_volume_file

        return convert_volume_file(src, out, verify, log)
    if target == "hf":
        from .hf import check_hf_output, convert_hf

        check_hf_output(out)
        return convert_hf(src, out, src_format, arch, verify, log)
    if out.is_dir():  # else the final rename fails naming our temp file
        raise ConversionError(f"-o {out} is a folder: give the output file's name (e.g. {out / 'weights.safetensors'})")
    safetensors_out = out.suffix not in TORCH_SUFFIXES if target == "timm" else out.suffix == ".safetensors"
    if safetensors_out and target == "sparse-fcmae":
        raise ConversionError("--to sparse-fcmae writes a PyTorch checkpoint; use a .pth name")
    state, extra = read_weights(src)
    fmt, layout = source_format(state, extra, src_format)
    size, in_chans = resolve_arch(state, layout, arch)
    dst = TARGETS[target]
    info = {"source": str(src), "from": fmt, "to": target, "arch": f"convnextv2_{size}", "in_chans": in_chans}
    log(f"[convert] {src} ({fmt}, convnextv2_{size}, in_chans {in_chans}) -> {out} ({target})")

    tmp = temp_beside(out, suffix=f".partial{out.suffix}")
    try:
        if safetensors_out:
            plan = list(convert_items(meta_state(state), layout, dst, size))
            extras = _timm_extras(size, {k for k, _ in plan}) if target == "timm" else []
            shapes = plan + [(k, torch.empty(v.shape, device="meta")) for k, v in extras]
            items = iter(list(extras))
            stream = convert_items(state, layout, dst, size, consume=True)
            write_safetensors(tmp, chain(stream, items), shapes,
                              {"format": "pt", "arch": f"convnextv2_{size}", "in_chans": str(in_chans), "source_format": fmt})
        else:
            new = dict(convert_items(state, layout, dst, size, consume=True))
            if target == "timm":
                new.update(_timm_extras(size, new.keys()))
                obj = new
            elif target == "official":
                obj = {"model": new}
            else:
                obj = {"model": {"encoder." + k: v for k, v in new.items()},
                       "config": {"model": {"name": size}, "data": {"in_chans": in_chans}, "converted_from": fmt}}
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            del new, obj
        del state
        if verify:
            from .verify import check_verified, verify_conversion

            check_verified(info, verify_conversion(src, tmp, layout, target, size, in_chans, log))
        publish(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    log(f"[convert] wrote {out}")
    return info


def chain(*its):
    for it in its:
        yield from it
