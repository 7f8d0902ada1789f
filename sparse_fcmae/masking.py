"""Patch masks for FCMAE: sampling, upsampling to feature resolution, visible coordinates.

Convention (as the official code): ``mask`` is ``(B, h*w)`` over the patch grid, ``1 = masked``.
"""
from __future__ import annotations

import torch


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Patches kept per sample; the official ``int(L * (1 - ratio))`` (49 patches, 0.6 -> 19)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return int(num_patches * (1 - mask_ratio))


def random_patch_mask(
    batch: int,
    grid: tuple[int, int],
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random per-sample patch mask ``(B, h*w)`` (float, 1 = masked) with a fixed kept count."""
    h, w = grid
    num_patches = h * w
    keep = num_kept(num_patches, mask_ratio)
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    ids_shuffle = noise.argsort(dim=1)
    mask = torch.ones(batch, num_patches, device=device)
    mask.scatter_(1, ids_shuffle[:, :keep], 0.0)
    return mask


def upsample_mask(mask: torch.Tensor, grid: tuple[int, int], scale: int) -> torch.Tensor:
    """``(B, h*w)`` patch mask -> ``(B, h*scale, w*scale)`` mask at feature resolution."""
    h, w = grid
    m = mask.reshape(-1, h, w)
    return m.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


def visible_coordinates(mask_map: torch.Tensor) -> torch.Tensor:
    """Integer coordinates ``[b, y, x]`` (int32, ``(N, 3)``) of visible sites, batch-major.

    Built from the mask, not from non-zero features: a visible site whose features happen to be
    all zero must stay in the sparse tensor (the official ``to_sparse`` would drop it).
    """
    return torch.nonzero(mask_map < 0.5).to(torch.int32).contiguous()
