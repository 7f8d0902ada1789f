"""The dense-masked encoder (the benchmark's baseline) runs its convolutions in the memory layout it is
set to, and the layout changes nothing but the memory order."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sparse_fcmae.masking import random_patch_mask
from sparse_fcmae.models.convnextv2 import DenseMaskedConvNeXtV2


class _ConvInputs(TorchDispatchMode):
    """Records, for every convolution (forward and backward), whether its input is channels_last."""

    def __init__(self):
        super().__init__()
        self.layouts: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default):
            x = args[1] if func is torch.ops.aten.convolution_backward.default else args[0]
            cl = x.is_contiguous(memory_format=torch.channels_last)
            nchw = x.is_contiguous()
            self.layouts.append("both" if cl and nchw else "cl" if cl else "nchw" if nchw else "strided")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fmt, name", [(torch.channels_last, "cl"), (torch.contiguous_format, "nchw")])
def test_every_convolution_runs_in_the_set_layout(fmt, name):
    torch.manual_seed(0)
    enc = DenseMaskedConvNeXtV2("atto", in_chans=3).set_memory_format(fmt)
    x = torch.randn(2, 3, 64, 64, requires_grad=True)  # an NCHW input: the encoder converts it itself
    mask = random_patch_mask(2, (2, 2), 0.5, generator=torch.Generator().manual_seed(1))
    rec = _ConvInputs()
    with rec:
        y = enc.forward_features(x, mask)
        y.square().sum().backward()
    # stem + 12 depthwise + 3 downsampling convolutions, forward and backward
    assert len(rec.layouts) == 2 * (1 + 12 + 3)
    assert set(rec.layouts) == {name}, rec.layouts
    assert y.is_contiguous(memory_format=fmt)


def test_layouts_agree():
    """Same output and gradients in both layouts (float64: only the summation order differs)."""
    torch.manual_seed(0)
    enc = DenseMaskedConvNeXtV2("atto", in_chans=3).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    mask = random_patch_mask(2, (2, 2), 0.5, generator=torch.Generator().manual_seed(1))
    outs = []
    for fmt in (torch.channels_last, torch.contiguous_format):
        enc.set_memory_format(fmt)
        enc.zero_grad()
        y = enc.forward_features(x, mask)
        y.square().sum().backward()
        outs.append((y.detach().clone(), [p.grad.clone() for p in enc.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-10, atol=1e-12)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_bad_memory_format_is_rejected():
    with pytest.raises(ValueError, match="memory_format"):
        DenseMaskedConvNeXtV2("atto").set_memory_format(torch.channels_last_3d)
