"""``sparse-fcmae convert``: read any ConvNeXt V2 checkpoint, write timm / official dense / sparse-fcmae weights,
or a Hugging Face transformers ``ConvNextV2Model`` folder (config.json + model.safetensors).

The mappings live in ``convert.py``; this module reads and writes files. It streams: each tensor is
converted, written and dropped before the next one, so converting holds about one copy of the weights.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil

import torch

from .checkpoint import CheckpointError, fsync_dir, load_checkpoint, publish, temp_beside, temp_dir_beside
from .convert import (
    ConversionError,
    check_complete,
    convert_items,
    convert_state,
    describe,
    detect_layout,
    encoder_state,
    meta_state,
)
from .convert3d import convert_volume_file, is_volume_checkpoint
from .models.sizes import SIZES

SOURCES = {"sparse-fcmae": "sparse", "official-fcmae": "sparse", "official-dense": "dense", "timm": "timm"}
TARGETS = {"timm": "timm", "official": "dense", "sparse-fcmae": "sparse", "hf": "hf", "dense3d": "dense3d"}
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state dict, whole checkpoint without its state)`` from a torch checkpoint or a .safetensors file."""
    path = pathlib.Path(path)
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
        fmt = {"dense": "official-dense", "timm": "timm"}[layout]
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
    if target == "dense3d":  # volumes: their own mapping and model (convert3d.py)
        return convert_volume_file(src, out, verify, log)
    if target == "hf":
        _check_hf_output(out)
        return _convert_hf(src, out, src_format, arch, verify, log)
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
            write_safetensors(tmp, _chain(stream, items), shapes,
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
            info["verify_rel_err"] = verify_conversion(src, tmp, layout, target, size, in_chans, log)
            if not info["verify_rel_err"] < 1e-5:
                raise VerifyError(f"verification failed: relative error {info['verify_rel_err']:.3e} >= 1e-5; no output written")
        publish(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    log(f"[convert] wrote {out}")
    return info


# ---------------------------------------------------------------------------------------------
# --to hf: a transformers ConvNextV2Model folder
# ---------------------------------------------------------------------------------------------
HF_CONFIG, HF_WEIGHTS = "config.json", "model.safetensors"


def _check_hf_output(out: pathlib.Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConversionError(f"-o {out} exists and is not a folder: --to hf writes a folder ({HF_CONFIG} + {HF_WEIGHTS})")
    if out.is_dir() and any(out.iterdir()):
        raise ConversionError(f"-o {out} is a folder that is not empty: --to hf writes a new folder; remove it or name another")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ConversionError("--to hf needs transformers (pip install -r requirements.txt)") from None


def hf_config(size: str, in_chans: int, dtype: torch.dtype):
    """The transformers ``ConvNextV2Config`` of ``convnextv2_<size>`` (``layer_norm_eps`` 1e-6, timm's head norm eps)."""
    from transformers import ConvNextV2Config

    depths, dims = SIZES[size.removeprefix("convnextv2_")]
    return ConvNextV2Config(num_channels=in_chans, depths=list(depths), hidden_sizes=list(dims), layer_norm_eps=1e-6,
                            drop_path_rate=0.0, architectures=["ConvNextV2Model"], dtype=str(dtype).removeprefix("torch."))


def _hf_extras(size: str, keys, dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """FCMAE has no final norm: HF's pooler ``layernorm`` gets weight 1, bias 0 (as the timm target's ``head.norm``)."""
    if "layernorm.weight" in keys:
        return []
    dim = SIZES[size][1][-1]
    return [("layernorm.weight", torch.ones(dim, dtype=dtype)), ("layernorm.bias", torch.zeros(dim, dtype=dtype))]


def _convert_hf(src, out: pathlib.Path, src_format: str, arch: str | None, verify: bool, log) -> dict:
    state, extra = read_weights(src)
    fmt, layout = source_format(state, extra, src_format)
    size, in_chans = resolve_arch(state, layout, arch)
    info = {"source": str(src), "from": fmt, "to": "hf", "arch": f"convnextv2_{size}", "in_chans": in_chans}
    log(f"[convert] {src} ({fmt}, convnextv2_{size}, in_chans {in_chans}) -> {out} (hf)")

    tmp = temp_dir_beside(out)
    try:
        plan = list(convert_items(meta_state(state), layout, "hf", size))
        dtype = dict(plan)["embeddings.patch_embeddings.weight"].dtype
        extras = _hf_extras(size, {k for k, _ in plan}, dtype)
        shapes = plan + [(k, torch.empty(v.shape, dtype=v.dtype, device="meta")) for k, v in extras]
        stream = convert_items(state, layout, "hf", size, consume=True)
        write_safetensors(tmp / HF_WEIGHTS, _chain(stream, iter(extras)), shapes,
                          {"format": "pt", "arch": f"convnextv2_{size}", "in_chans": str(in_chans), "source_format": fmt})
        del state
        with open(tmp / HF_CONFIG, "w") as f:
            f.write(hf_config(size, in_chans, dtype).to_json_string())
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        if verify:
            info["verify_rel_err"] = verify_hf(src, tmp, layout, size, in_chans, log)
            if not info["verify_rel_err"] < 1e-5:
                raise VerifyError(f"verification failed: relative error {info['verify_rel_err']:.3e} >= 1e-5; no output written")
        publish(tmp, out)  # onto a missing or empty folder
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log(f"[convert] wrote {out}/{HF_CONFIG} and {out}/{HF_WEIGHTS}")
    return info


@torch.no_grad()
def verify_hf(src, folder: pathlib.Path, src_layout: str, size: str, in_chans: int, log=print) -> float:
    """Max relative error of the HF folder (loaded by ``from_pretrained``, offline) against a reference built
    from the source file without this project's mappings: the sparse encoder (mask ratio 0) for sparse
    sources, timm (timm's own filter for official dense files) otherwise. Compares ``last_hidden_state``
    with ``forward_features`` and ``pooler_output`` with the pooled, normalized features (fp32, 2x64x64)."""
    import torch.nn.functional as F
    from timm.models.convnext import checkpoint_filter_fn
    from transformers import ConvNextV2Model

    from .models import SparseConvNeXtV2

    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # keep stderr to the one error line of a failure
    try:
        hf, loading = ConvNextV2Model.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    bad = [k for what in ("missing_keys", "unexpected_keys", "mismatched_keys") for k in loading.get(what, [])]
    if bad:
        raise VerifyError(f"verification failed: transformers does not accept the weights: {bad[0]}")
    hf = hf.float().eval()
    src_state, _ = read_weights(src)
    if src_layout == "sparse":
        ref = SparseConvNeXtV2(size, in_chans=in_chans)
        ref.load_state_dict(encoder_state(src_state), strict=True)
    else:
        ref = _timm_model(size, in_chans)
        _load_timm_state(ref, checkpoint_filter_fn(dict(src_state), ref) if src_layout == "dense" else src_state)
    ref = ref.float().eval()
    x = torch.randn(2, in_chans, 64, 64, generator=torch.Generator().manual_seed(0))
    got = hf(pixel_values=x)
    want = ref.forward_features(x)
    if src_layout == "sparse":  # FCMAE has no final norm: the pooler is a plain layer norm (weight 1, bias 0)
        pooled = F.layer_norm(want.mean((-2, -1)), (want.shape[1],), eps=1e-6)
    else:
        pooled = ref.forward_head(want, pre_logits=True)

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))

    err, err_pool = rel(got.last_hidden_state, want), rel(got.pooler_output, pooled)
    what = "sparse" if src_layout == "sparse" else "dense"
    log(f"[convert] verify: max |hf - {what}| / max |{what}| = {max(err, err_pool):.3e} (last_hidden_state {err:.3e}, "
        f"pooler_output {err_pool:.3e}; convnextv2_{size}, input 2x{in_chans}x64x64, fp32)")
    return max(err, err_pool)


def _chain(*its):
    for it in its:
        yield from it


class VerifyError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# Verification: the sparse encoder (mask ratio 0) against the dense model, on a random batch
# ---------------------------------------------------------------------------------------------
def _timm_model(size: str, in_chans: int, file: pathlib.Path | None = None):
    import timm

    if file is None:
        return timm.create_model(f"convnextv2_{size}", pretrained=False, num_classes=0, in_chans=in_chans)
    # the exact way users load our timm files (local file only: nothing is downloaded)
    return timm.create_model(f"convnextv2_{size}", pretrained=True, pretrained_cfg_overlay=dict(file=str(file)),
                             num_classes=0, in_chans=in_chans)


def _load_timm_state(model, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    # the encoder is verified: a classifier head (fine-tuned, timm or official files) has no place in the
    # features-only model, and forward_features never reads it
    bad = [k for k in missing if not k.startswith("head.")] + [k for k in unexpected if not k.startswith("head.")]
    if bad:
        raise ConversionError(f"dense model does not accept the weights: {bad[0]}")


@torch.no_grad()
def verify_conversion(src, out: pathlib.Path, src_layout: str, target: str, size: str, in_chans: int, log=print) -> float:
    """Max |sparse - dense| / max |dense| of the stage-4 features at mask ratio 0 (fp32, batch 2, 64 px)."""
    from timm.models.convnext import checkpoint_filter_fn

    from .models import SparseConvNeXtV2

    src_state, _ = read_weights(src)
    dense = _timm_model(size, in_chans, out if target == "timm" else None)
    if target == "official":
        # timm's own official->timm filter: an independent check of our dense layout
        _load_timm_state(dense, checkpoint_filter_fn(read_weights(out)[0], dense))
    elif target == "sparse-fcmae":
        if src_layout == "dense":
            _load_timm_state(dense, checkpoint_filter_fn(dict(src_state), dense))
        else:
            _load_timm_state(dense, convert_state(src_state, src_layout, "timm", size))
    sparse_state = (read_weights(out)[0] if target == "sparse-fcmae" else convert_state(src_state, src_layout, "sparse", size))
    sparse = SparseConvNeXtV2(size, in_chans=in_chans)
    sparse.load_state_dict({k.removeprefix("encoder."): v for k, v in sparse_state.items()}, strict=True)
    sparse.eval()
    dense.eval()
    x = torch.randn(2, in_chans, 64, 64, generator=torch.Generator().manual_seed(0))
    a = sparse.forward_features(x)
    b = dense.forward_features(x)
    err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
    log(f"[convert] verify: max |sparse - dense| / max |dense| = {err:.3e} (convnextv2_{size}, input 2x{in_chans}x64x64, fp32, mask ratio 0)")
    return err
