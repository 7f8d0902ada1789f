"""Fine-tuning and linear probing on volumes (``model.spatial_dims=3``): the dense 3D ConvNeXt V2
(``ConvNeXtV2_3D``) with a classification head, from ``convert --to dense3d`` weights or a 3D pretraining
checkpoint (converted on the fly, the same mapping). Kept apart so images stay timm's path (``model``)."""
from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from ..data.volumes import VOLUME_DATASETS


def spatial_dims(cfg: DictConfig) -> int:
    return cfg.model.spatial_dims


def validate_dims(cfg: DictConfig) -> None:
    """Images or volumes, the data and the kernel agreeing with ``model.spatial_dims``."""
    dims, name = spatial_dims(cfg), cfg.data.name
    if dims not in (2, 3):
        raise ValueError(f"model.spatial_dims must be 2 (images) or 3 (volumes), got {dims!r}")
    if (name in VOLUME_DATASETS) != (dims == 3):
        raise ValueError(f"data={name} gives {'volumes' if dims == 2 else 'images'}, model.spatial_dims={dims} expects "
                         f"{'images' if dims == 2 else 'volumes'}: use model.spatial_dims=3 with data=volumes")
    k = cfg.model.kernel_size
    if dims == 2 and k != 7:
        raise ValueError(f"{cfg.mode} fine-tunes timm's ConvNeXt V2, whose kernel is 7: model.kernel_size must be 7")
    if dims == 3:
        from ..models.base import KERNEL_SIZES  # here: an image run loads nothing of the models package

        if k not in KERNEL_SIZES:
            raise ValueError(f"model.kernel_size must be one of {KERNEL_SIZES}, got {k!r}")
    if dims == 3 and (cfg.aug.mixup or cfg.aug.cutmix):
        raise ValueError("aug.mixup and aug.cutmix mix images (timm's): leave them 0 for volumes")


def arch_name(cfg: DictConfig) -> str:
    return f"convnextv2_{cfg.model.name}" + ("_3d" if spatial_dims(cfg) == 3 else "")


def load_dense3d_weights(path: str) -> tuple[dict[str, torch.Tensor], str, int, int, str]:
    """``(ConvNeXtV2_3D state, size, in_chans, kernel_size, what it was)`` of ``convert --to dense3d`` weights (a
    fine-tuned 3D checkpoint's too) or a 3D sparse checkpoint (mapped by ``sparse_to_dense3d``)."""
    from ..convert.dense3d import dense3d_to_sparse, describe3d, is_volume_checkpoint, sparse_to_dense3d
    from ..convert.files import read_weights
    from ..convert.rules import encoder_state

    state, _ = read_weights(path)
    if is_volume_checkpoint(state):
        enc = encoder_state(state) if any(k.startswith("encoder.") for k in state) else state
        size, in_chans, k = describe3d(enc)
        return sparse_to_dense3d(enc), size, in_chans, k, "3D sparse checkpoint, converted"
    stem = state.get("stem.0.weight")
    if stem is None or stem.ndim != 5:
        raise ValueError(f"weights {path} are not a 3D model: model.spatial_dims=3 takes `sparse-fcmae convert "
                         "--to dense3d` weights or a 3D pretraining checkpoint")
    features = {k: v for k, v in state.items() if not k.startswith("head.")}
    size, in_chans, k = describe3d(dense3d_to_sparse(features))
    return state, size, in_chans, k, "dense3d"


def build_volume_classifier(cfg: DictConfig, num_classes: int, in_chans: int) -> nn.Module:
    """``ConvNeXtV2_3D`` with a ``num_classes`` head; from ``cfg.weights`` when given (size, channels and kernel
    must match the config; another task's head is dropped and a fresh one trained)."""
    from ..models.convnext3d import ConvNeXtV2_3D

    k = cfg.model.kernel_size
    model = ConvNeXtV2_3D(cfg.model.name, in_chans=in_chans, num_classes=num_classes, kernel_size=k,
                          drop_path_rate=cfg.drop_path_rate)
    if not cfg.weights:
        return model
    state, size, w_chans, w_k, what = load_dense3d_weights(cfg.weights)
    if size != cfg.model.name:
        raise ValueError(f"weights {cfg.weights} are convnextv2_{size}, but model={cfg.model.name}; pass model={size}")
    if w_chans != in_chans:
        raise ValueError(f"weights {cfg.weights} take {w_chans} input channels, the data has {in_chans}")
    if w_k != k:
        raise ValueError(f"weights {cfg.weights} have {w_k}^3 depthwise kernels; pass model.kernel_size={w_k}")
    if "head.fc.weight" in state and state["head.fc.weight"].shape[0] != num_classes:
        state = {n: v for n, v in state.items() if not n.startswith("head.fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not n.startswith("head.fc.") for n in missing):
        raise ValueError(f"weights {cfg.weights} do not fit {arch_name(cfg)}: missing {missing}, unexpected {unexpected}")
    print(f"[{cfg.mode}] loaded {what} weights from {cfg.weights}")
    return model
