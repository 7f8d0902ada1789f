"""Reconstruction panels: original | masked | reconstruction (reconstruction pasted into masked patches);
volumes show their middle depth slice."""
from __future__ import annotations

import os

import torch
from torchvision.utils import make_grid

from .checkpoint import atomic_write
from .masking import upsample_mask


def middle_slice(vols: torch.Tensor, mask: torch.Tensor, recon: torch.Tensor, patch_size: int = 32):
    """Volumes ``(B, C, D, H, W)``, their mask ``(B, d*h*w)`` and reconstructions -> the middle depth slice
    ``(B, C, H, W)`` of each, with the mask of the patch plane it cuts ``(B, h*w)``."""
    z = vols.shape[2] // 2
    grid = [s // patch_size for s in vols.shape[2:]]
    return vols[:, :, z], mask.reshape(-1, *grid)[:, z // patch_size].reshape(mask.shape[0], -1), recon[:, :, z]


def reconstruction_panel(imgs: torch.Tensor, mask: torch.Tensor, recon: torch.Tensor, patch_size: int = 32) -> torch.Tensor:
    """``(3, H', W')`` image in [0, 1]: one row per sample, three columns; volumes show their middle slice."""
    if imgs.ndim == 5:
        imgs, mask, recon = middle_slice(imgs, mask, recon, patch_size)
    b, c, h, w = imgs.shape
    m = upsample_mask(mask, (h // patch_size, w // patch_size), patch_size).unsqueeze(1).to(imgs.dtype)
    masked = imgs * (1 - m)
    pasted = imgs * (1 - m) + recon * m  # visible patches as given, masked ones predicted
    rows = torch.stack([imgs, masked, pasted], dim=1).reshape(b * 3, c, h, w)
    lo = imgs.amin(dim=(1, 2, 3)).repeat_interleave(3).view(-1, 1, 1, 1)
    hi = imgs.amax(dim=(1, 2, 3)).repeat_interleave(3).view(-1, 1, 1, 1)
    rows = ((rows - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    if c == 1:
        rows = rows.expand(-1, 3, -1, -1)
    elif c != 3:
        rows = rows[:, :3] if c > 3 else rows.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    rows = torch.where(m.repeat_interleave(3, 0).bool() & (torch.arange(b * 3) % 3 == 1).view(-1, 1, 1, 1), 0.5, rows)
    return make_grid(rows, nrow=3, padding=2, pad_value=1.0)


def save_png(img: torch.Tensor, path: str | os.PathLike) -> None:
    """Save a ``(3, H, W)`` [0, 1] tensor as PNG, atomically."""
    from PIL import Image

    arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    atomic_write(path, lambda f: Image.fromarray(arr).save(f, format="PNG"))
