"""Building MinkowskiEngine sparse tensors from masked dense maps, and densifying them back.

One code path for images and volumes: a map is ``(B, C, *S)`` with ``S = (H, W)`` or ``(D, H, W)``, and
the coordinates are ``[b, *position]`` (ME's dimension is ``len(S)``).
"""
from __future__ import annotations

import MinkowskiEngine as ME
import torch

from ..masking import visible_coordinates
from .neighbors import remember_grid


def to_sparse(x: torch.Tensor, mask_map: torch.Tensor, patch: int | None = None) -> ME.SparseTensor:
    """Dense ``(B, C, *S)`` -> SparseTensor of the sites where ``mask_map (B, *S)`` is visible.

    Coordinates come from the mask (every visible site is kept, whatever its features). ``patch``: the mask is
    an upsampled patch mask, constant over aligned ``patch``-sided cells (the encoder's: 8 sites at stride 1);
    recorded so the downsamplings can read their maps off the patch corners, with no sort and no host sync.
    """
    if x.ndim != mask_map.ndim + 1 or x.shape[0] != mask_map.shape[0] or x.shape[2:] != mask_map.shape[1:]:
        raise ValueError(f"to_sparse: features {tuple(x.shape)} and mask {tuple(mask_map.shape)} disagree")
    coords = visible_coordinates(mask_map)
    feats = x.movedim(1, -1)[tuple(coords.long().unbind(1))]
    out = ME.SparseTensor(
        feats,
        coordinates=coords,
        quantization_mode=ME.SparseTensorQuantizationMode.RANDOM_SUBSAMPLE,  # coordinates are unique
    )
    remember_grid(out, *mask_map.shape, patch=patch)
    return out


def with_features(x: ME.SparseTensor, feats: torch.Tensor) -> ME.SparseTensor:
    """A SparseTensor on ``x``'s coordinates with new features (no coordinate work)."""
    return ME.SparseTensor(feats, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager)


def batch_index(x: ME.SparseTensor) -> torch.Tensor:
    """Sample index (int64, ``(N,)``) of every row of ``x.F``."""
    return x.C[:, 0].long()


def densify(x: ME.SparseTensor, batch: int, *spatial: int) -> torch.Tensor:
    """SparseTensor -> dense ``(B, C, *spatial)`` (channels-last memory) with an explicit full shape;
    ``spatial`` is the grid at ``x``'s tensor stride, one size per axis (``height, width`` or
    ``depth, height, width``).

    Written out rather than ME's ``dense()``: that one infers the shape from the largest coordinate
    unless given one, so a batch whose last patch row/column/plane is masked everywhere comes back too
    small (official issue #79), and its ``min_coordinate`` must be a CPU tensor that it then subtracts
    from CUDA coordinates (ME 0.5.4 fails on GPU). One differentiable scatter, on the features' device.
    """
    if len(spatial) != x.D:
        raise ValueError(f"densify: {x.D}-D sparse tensor, got the spatial shape {spatial}")
    coords = x.C.long()
    pos = tuple(coords[:, 1 + a] // s for a, s in enumerate(x.tensor_stride))
    out = x.F.new_zeros(batch, *spatial, x.F.shape[1])
    out[(coords[:, 0],) + pos] = x.F
    return out.movedim(-1, 1)
