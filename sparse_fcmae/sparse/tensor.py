"""Building MinkowskiEngine sparse tensors from masked dense maps, and densifying them back."""
from __future__ import annotations

import MinkowskiEngine as ME
import torch

from ..masking import visible_coordinates
from .neighbors import remember_grid


def to_sparse(x: torch.Tensor, mask_map: torch.Tensor) -> ME.SparseTensor:
    """Dense ``(B, C, H, W)`` -> SparseTensor of the sites where ``mask_map (B, H, W)`` is visible.

    Coordinates come from the mask (every visible site is kept, whatever its features).
    """
    coords = visible_coordinates(mask_map)
    b, y, xx = coords.long().unbind(1)
    feats = x.permute(0, 2, 3, 1)[b, y, xx]
    out = ME.SparseTensor(
        feats,
        coordinates=coords,
        quantization_mode=ME.SparseTensorQuantizationMode.RANDOM_SUBSAMPLE,  # coordinates are unique
    )
    remember_grid(out, *mask_map.shape)
    return out


def with_features(x: ME.SparseTensor, feats: torch.Tensor) -> ME.SparseTensor:
    """A SparseTensor on ``x``'s coordinates with new features (no coordinate work)."""
    return ME.SparseTensor(feats, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager)


def batch_index(x: ME.SparseTensor) -> torch.Tensor:
    """Sample index (int64, ``(N,)``) of every row of ``x.F``."""
    return x.C[:, 0].long()


def densify(x: ME.SparseTensor, batch: int, height: int, width: int) -> torch.Tensor:
    """SparseTensor -> dense ``(B, C, height, width)`` (channels_last memory) with an explicit full shape.

    Written out rather than ME's ``dense()``: that one infers the shape from the largest coordinate
    unless given one, so a batch whose last patch row/column is masked everywhere comes back too small
    (official issue #79), and its ``min_coordinate`` must be a CPU tensor that it then subtracts from
    CUDA coordinates (ME 0.5.4 fails on GPU). One differentiable scatter, on the features' device.
    """
    coords = x.C.long()
    stride = x.tensor_stride
    rows, cols = coords[:, 1] // stride[0], coords[:, 2] // stride[1]
    out = x.F.new_zeros(batch, height, width, x.F.shape[1])
    out[coords[:, 0], rows, cols] = x.F
    return out.permute(0, 3, 1, 2)
