"""``convert --verify``: the converted weights against an independent model on a random batch."""
from __future__ import annotations

import pathlib

import torch

from .files import read_weights
from .rules import ConversionError, convert_state


class VerifyError(RuntimeError):
    pass


TOLERANCE = 1e-5  # relative error of --verify's comparison (the message below says it)


def check_verified(info: dict, rel_err: float) -> None:
    """Record ``--verify``'s error in ``info``; raise (nothing is published) when it is not below tolerance."""
    info["verify_rel_err"] = rel_err
    if not rel_err < TOLERANCE:
        raise VerifyError(f"verification failed: relative error {rel_err:.3e} >= 1e-5; no output written")


# ---------------------------------------------------------------------------------------------
# Verification: the sparse encoder (mask ratio 0) against the dense model, on a random batch
# ---------------------------------------------------------------------------------------------
def timm_model(size: str, in_chans: int, file: pathlib.Path | None = None):
    import timm

    if file is None:
        return timm.create_model(f"convnextv2_{size}", pretrained=False, num_classes=0, in_chans=in_chans)
    # the exact way users load our timm files (local file only: nothing is downloaded)
    return timm.create_model(f"convnextv2_{size}", pretrained=True, pretrained_cfg_overlay=dict(file=str(file)),
                             num_classes=0, in_chans=in_chans)


def load_timm_state(model, state: dict[str, torch.Tensor]) -> None:
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

    from ..models import SparseConvNeXtV2

    src_state, _ = read_weights(src)
    dense = timm_model(size, in_chans, out if target == "timm" else None)
    if target == "official":
        # timm's own official->timm filter: an independent check of our dense layout
        load_timm_state(dense, checkpoint_filter_fn(read_weights(out)[0], dense))
    elif target == "sparse-fcmae":
        if src_layout == "dense":
            load_timm_state(dense, checkpoint_filter_fn(dict(src_state), dense))
        else:
            load_timm_state(dense, convert_state(src_state, src_layout, "timm", size))
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
