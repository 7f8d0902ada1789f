"""Patch masks for FCMAE: sampling, upsampling to feature resolution, visible coordinates.

Convention (as the official code): ``mask`` is ``(B, prod(grid))`` over the patch grid, ``1 = masked``;
``grid`` is ``(h, w)`` for images and ``(d, h, w)`` for volumes, flattened row-major (last axis fastest).
"""
from __future__ import annotations

import math

import torch


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Patches kept per sample; the official ``int(L * (1 - ratio))`` (49 patches, 0.6 -> 19)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return int(num_patches * (1 - mask_ratio))


def random_patch_mask(
    batch: int,
    grid: tuple[int, ...],
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random per-sample patch mask ``(B, prod(grid))`` (float, 1 = masked) with a fixed kept count."""
    num_patches = math.prod(grid)
    keep = num_kept(num_patches, mask_ratio)
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    ids_shuffle = noise.argsort(dim=1)
    mask = torch.ones(batch, num_patches, device=device)
    mask.scatter_(1, ids_shuffle[:, :keep], 0.0)
    return mask


def upsample_mask(mask: torch.Tensor, grid: tuple[int, ...], scale: int) -> torch.Tensor:
    """``(B, prod(grid))`` patch mask -> ``(B, *(g * scale for g in grid))`` mask at feature resolution."""
    m = mask.reshape(-1, *grid)
    for axis in range(1, m.ndim):
        m = m.repeat_interleave(scale, dim=axis)
    return m


def visible_coordinates(mask_map: torch.Tensor) -> torch.Tensor:
    """Integer coordinates ``[b, *position]`` (int32, ``(N, 1 + D)``) of visible sites, batch-major.

    Built from the mask, not from non-zero features: a visible site whose features happen to be
    all zero must stay in the sparse tensor (the official ``to_sparse`` would drop it).
    """
    return torch.nonzero(mask_map < 0.5).to(torch.int32).contiguous()
