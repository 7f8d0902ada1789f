"""Building MinkowskiEngine sparse tensors from masked dense maps, and densifying them back."""
from __future__ import annotations

import MinkowskiEngine as ME
import torch

from ..masking import visible_coordinates


def to_sparse(x: torch.Tensor, mask_map: torch.Tensor) -> ME.SparseTensor:
    """Dense ``(B, C, H, W)`` -> SparseTensor of the sites where ``mask_map (B, H, W)`` is visible.

    Coordinates come from the mask (every visible site is kept, whatever its features).
    """
    coords = visible_coordinates(mask_map)
    b, y, xx = coords.long().unbind(1)
    feats = x.permute(0, 2, 3, 1)[b, y, xx]
    return ME.SparseTensor(
        feats,
        coordinates=coords,
        quantization_mode=ME.SparseTensorQuantizationMode.RANDOM_SUBSAMPLE,  # coordinates are unique
    )


def with_features(x: ME.SparseTensor, feats: torch.Tensor) -> ME.SparseTensor:
    """A SparseTensor on ``x``'s coordinates with new features (no coordinate work)."""
    return ME.SparseTensor(feats, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager)


def batch_index(x: ME.SparseTensor) -> torch.Tensor:
    """Sample index (int64, ``(N,)``) of every row of ``x.F``."""
    return x.C[:, 0].long()


def densify(x: ME.SparseTensor, batch: int, height: int, width: int) -> torch.Tensor:
    """SparseTensor -> dense ``(B, C, height, width)`` with an explicit full shape.

    ME's ``dense()`` without a shape infers it from the largest coordinate, so a batch whose last
    patch row/column is masked everywhere would come back too small (official issue #79).
    """
    shape = torch.Size([batch, x.F.shape[1], height, width])
    dense, _, _ = x.dense(shape=shape, min_coordinate=torch.zeros(2, dtype=torch.int32), contract_stride=True)
    return dense
