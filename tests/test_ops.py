"""Sparse ops against dense oracles and float64 gradcheck."""
import pytest
import torch
import torch.nn.functional as F
from _util import rel_err
from timm.layers.grn import GlobalResponseNorm

from sparse_fcmae.masking import random_patch_mask, upsample_mask
from sparse_fcmae.ops import sparse_depthwise_conv_reference, sparse_grn_reference
from sparse_fcmae.ops.kernel_layout import depthwise_kernel_to_weight
from sparse_fcmae.sparse import neighbor_table, to_sparse


def test_sparse_grn_equals_timm_grn_when_every_site_is_present():
    b, c, h, w = 3, 20, 5, 6
    x = torch.randn(b, h, w, c)
    grn = GlobalResponseNorm(c, channels_last=True)
    with torch.no_grad():
        grn.weight.normal_()
        grn.bias.normal_()
    expected = grn(x)
    batch = torch.arange(b).repeat_interleave(h * w)
    out = sparse_grn_reference(x.reshape(-1, c), batch, b, grn.weight, grn.bias)
    assert rel_err(out.reshape(b, h, w, c), expected) < 1e-6


def test_sparse_grn_gradcheck_float64_with_empty_sample_and_zero_channel():
    n, c = 9, 5
    x = torch.randn(n, c, dtype=torch.float64)
    x[:, 2] = 0.0  # a channel that is zero everywhere: n = 0, gradient must be finite
    batch = torch.tensor([0, 0, 0, 0, 2, 2, 2, 2, 2])  # sample 1 has no points
    x.requires_grad_()
    gamma = torch.randn(1, c, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(1, c, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, g, bb: sparse_grn_reference(a, batch, 3, g, bb), (x, gamma, beta))
    out = sparse_grn_reference(x, batch, 3, gamma, beta)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("kernel_size,c", [(7, 13), (3, 8), (5, 1)])
def test_depthwise_on_me_neighbours_equals_dense_conv_at_visible_sites(kernel_size, c):
    b, grid, scale = 2, (3, 3), 4
    mask = random_patch_mask(b, grid, 0.5)
    mask_map = upsample_mask(mask, grid, scale)  # (B, 12, 12)
    visible = (1 - mask_map).unsqueeze(1)
    x = torch.randn(b, c, 12, 12) * visible
    s = to_sparse(x, mask_map)
    kernel = torch.randn(kernel_size ** 2, c)
    bias = torch.randn(1, c)
    out = sparse_depthwise_conv_reference(s.F, neighbor_table(s, kernel_size), kernel, bias)
    dense = F.conv2d(x, depthwise_kernel_to_weight(kernel), bias.reshape(-1), padding=kernel_size // 2, groups=c)
    coords = s.C.long()
    expected = dense[coords[:, 0], :, coords[:, 1], coords[:, 2]]
    assert rel_err(out, expected) < 1e-6


def test_depthwise_reference_gradcheck_float64():
    n, k, c = 7, 9, 3
    feats = torch.randn(n, c, dtype=torch.float64, requires_grad=True)
    table = torch.randint(-1, n, (n, k))
    kernel = torch.randn(k, c, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, c, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda f, w, bb: sparse_depthwise_conv_reference(f, table, w, bb), (feats, kernel, bias))
