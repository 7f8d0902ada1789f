"""Masked pixels cannot reach the encoder: change only the pixels of masked patches and nothing the
encoder computes changes, with a mask that is not symmetric under transposition (so a swapped row/column
patch order would leak and fail here). The patch order is the official one: mask[b, i * w + j] covers
rows i*32..i*32+31 and columns j*32..j*32+31."""
from __future__ import annotations

import pytest
import torch

from sparse_fcmae.models import DenseMaskedConvNeXtV2, SparseConvNeXtV2


def _asymmetric_mask(batch: int, h: int, w: int) -> torch.Tensor:
    m = torch.zeros(batch, h, w)
    m[:, 0, 1] = 1.0  # patch (row 0, column 1) masked, (1, 0) visible: transposing the layout breaks this
    m[:, 1, 2] = 1.0
    m[1, 2, 0] = 1.0  # and per-sample differences
    assert not torch.equal(m[0], m[0].T)
    return m.reshape(batch, h * w)


def _change_masked_pixels(x: torch.Tensor, mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``x`` with new random values in every masked 32x32 patch, the visible pixels untouched."""
    pix = mask.reshape(-1, 1, h, w).repeat_interleave(32, 2).repeat_interleave(32, 3).bool()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype) * 5
    return torch.where(pix, noise, x)


@pytest.mark.parametrize("encoder_cls", [SparseConvNeXtV2, DenseMaskedConvNeXtV2])
def test_masked_pixels_change_nothing_the_encoder_computes(encoder_cls):
    torch.manual_seed(0)
    enc = encoder_cls("atto", in_chans=3)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if ".grn." in name:
                p.normal_(0.0, 0.1)
    h, w = 3, 3
    x = torch.randn(2, 3, 32 * h, 32 * w)
    mask = _asymmetric_mask(2, h, w)
    x2 = _change_masked_pixels(x, mask, h, w)
    assert not torch.equal(x, x2)
    outs = []
    for inp in (x, x2):
        enc.zero_grad()
        y = enc.forward_features(inp, mask)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        outs.append((y.detach(), [p.grad.clone() for p in enc.parameters()]))
    assert torch.equal(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1], outs[1][1]):
        assert torch.equal(a, b)
    # and the visible pixels do reach it (the test is not vacuous)
    x3 = _change_masked_pixels(x, 1.0 - mask, h, w)
    assert not torch.equal(enc.forward_features(x3, mask), outs[0][0])
