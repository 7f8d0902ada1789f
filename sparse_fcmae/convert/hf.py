"""``convert --to hf``: a transformers ``ConvNextV2Model`` folder, and its check against the source."""
from __future__ import annotations

import os
import pathlib
import shutil

import torch

from ..checkpoint import fsync_dir, publish, temp_dir_beside
from ..models.sizes import SIZES
from .files import HF_CONFIG, HF_WEIGHTS, chain, read_weights, resolve_arch, source_format, write_safetensors
from .rules import ConversionError, convert_items, encoder_state
from .shapes import meta_state
from .verify import VerifyError, check_verified, load_timm_state, timm_model


def check_hf_output(out: pathlib.Path) -> None:
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


def convert_hf(src, out: pathlib.Path, src_format: str, arch: str | None, verify: bool, log) -> dict:
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
        write_safetensors(tmp / HF_WEIGHTS, chain(stream, iter(extras)), shapes,
                          {"format": "pt", "arch": f"convnextv2_{size}", "in_chans": str(in_chans), "source_format": fmt})
        del state
        with open(tmp / HF_CONFIG, "w") as f:
            f.write(hf_config(size, in_chans, dtype).to_json_string())
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        if verify:
            check_verified(info, verify_hf(src, tmp, layout, size, in_chans, log))
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
    from transformers.utils import logging as hf_logging

    from ..models import SparseConvNeXtV2

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
        ref = timm_model(size, in_chans)
        load_timm_state(ref, checkpoint_filter_fn(dict(src_state), ref) if src_layout == "dense" else src_state)
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
