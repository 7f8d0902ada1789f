"""Volumes: the 3-D neighbour and child tables against MinkowskiEngine's kernel maps, the compiled depthwise
kernels with k^3 taps against dense ``conv3d``, and the fast 3D convolutions against ``nn.Conv3d``."""
import itertools

import MinkowskiEngine as ME
import pytest
import torch
import torch.nn.functional as F
from _util import compiled_path_only, me_children, me_table, rel_err  # noqa: F401  (compiled_path_only: autouse)

from sparse_fcmae.masking import random_patch_mask, upsample_mask
from sparse_fcmae.ops import sparse_depthwise_conv, sparse_depthwise_conv_reference, transpose_neighbors
from sparse_fcmae.sparse import child_table, neighbor_table, to_sparse


def _mask(batch, grid, ratio, seed=0):
    return random_patch_mask(batch, grid, ratio, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ tables vs ME
@pytest.mark.parametrize("patch", [None, 8], ids=["sorted-cells", "patch-corners"])
def test_3d_tables_equal_me_kernel_maps_at_every_stage(patch):
    grid, scale, batch = (2, 2, 3), 8, 3
    mask = _mask(batch, grid, 0.4)
    mask[-1] = 1  # a fully masked last sample
    mask.view(batch, *grid)[:, :, -1] = 1  # the last patch plane of the last axis masked everywhere
    x = to_sparse(torch.randn(batch, 2, *(g * scale for g in grid)), upsample_mask(mask, grid, scale), patch=patch)
    assert x.D == 3 and x.C.shape[1] == 4
    stages = [x]
    for _ in range(3):
        out_key, children = child_table(stages[-1], 2)
        stages.append(ME.SparseTensor(torch.zeros(children.shape[0], 2), coordinate_map_key=out_key,
                                      coordinate_manager=x.coordinate_manager))
    checked = 0
    for i, s in enumerate(stages):
        for k in (3, 5, 7):
            table = neighbor_table(s, k)
            expected = me_table(s, k)
            assert table.shape[1] == k ** 3 and torch.equal(table, expected), (i, k)
            assert torch.equal(transpose_neighbors(expected), expected.flip(1)), (i, k)  # symmetric: see neighbor_table
            checked += int((table >= 0).sum())
        if i < 3:
            out_key, children = child_table(s, 2)
            assert children.shape[1] == 8 and torch.equal(children, me_children(s, out_key, 2)), i
    assert checked > 0


# --------------------------------------------------------------------------------- depthwise, 3D
def _visible_volume(batch=2, grid=(2, 1, 2), scale=4, seed=0):
    mask = _mask(batch, grid, 0.5, seed)
    mask_map = upsample_mask(mask, grid, scale)
    return mask_map, torch.nonzero(mask_map < 0.5)


@pytest.mark.parametrize("k", [3, 5, 7])
def test_compiled_depthwise_with_k_cubed_taps_matches_dense_conv3d_and_the_reference(k):
    mask_map, coords = _visible_volume()
    x = to_sparse(torch.zeros(mask_map.shape[0], 1, *mask_map.shape[1:]), mask_map)
    table = neighbor_table(x, k)
    n, c = table.shape[0], 6
    g = torch.Generator().manual_seed(k)
    feats = torch.randn(n, c, generator=g, dtype=torch.float64)
    kernel = torch.randn(k ** 3, c, generator=g, dtype=torch.float64)
    bias = torch.randn(1, c, generator=g, dtype=torch.float64)
    out = sparse_depthwise_conv(feats, table, kernel, bias, symmetric=True)
    # oracle: dense conv3d on the zero-filled volume, the kernel laid out by explicit loops over ME's
    # offset order (i0 + k*i1 + k*k*i2, first axis fastest)
    dense_in = torch.zeros(mask_map.shape[0], c, *mask_map.shape[1:], dtype=torch.float64)
    b, z, y, xx = x.C.long().unbind(1)
    dense_in[b, :, z, y, xx] = feats
    w = torch.zeros(c, 1, k, k, k, dtype=torch.float64)
    for i0, i1, i2 in itertools.product(range(k), repeat=3):
        w[:, 0, i0, i1, i2] = kernel[i0 + k * i1 + k * k * i2]
    dense = F.conv3d(dense_in, w, bias.reshape(-1), padding=k // 2, groups=c)
    assert rel_err(out, dense[b, :, z, y, xx]) < 1e-12
    # every gradient against the reference (float64)
    gy = torch.randn(n, c, generator=g, dtype=torch.float64)
    ins = [t.clone().requires_grad_() for t in (feats, kernel, bias)]
    sparse_depthwise_conv(ins[0], table, ins[1], ins[2], symmetric=True).backward(gy)
    refs = [t.clone().requires_grad_() for t in (feats, kernel, bias)]
    sparse_depthwise_conv_reference(refs[0], table, refs[1], refs[2]).backward(gy)
    for a, r in zip(ins, refs):
        assert rel_err(a.grad, r.grad) < 1e-12


def test_compiled_depthwise_3d_gradcheck():
    g = torch.Generator().manual_seed(3)
    mask_map = (torch.rand(1, 3, 4, 3, generator=g) < 0.4).float()  # scattered sites: some taps absent
    x = to_sparse(torch.zeros(1, 1, 3, 4, 3), mask_map)
    table = neighbor_table(x, 3)
    n = table.shape[0]
    assert 5 < n < 36 and (table < 0).any()
    ins = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((n, 3), (27, 3), (1, 3))]
    assert torch.autograd.gradcheck(lambda f, w, b: sparse_depthwise_conv(f, table, w, b, symmetric=True), ins)


def _same_values_and_gradients(conv, fast, shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    outs = []
    for f in (fast, lambda a: torch.nn.Conv3d.forward(conv, a)):  # the oracle: Conv3d's own forward
        conv.zero_grad()
        x.grad = None
        y = f(x)
        y.square().sum().backward()
        outs.append([y, x.grad, conv.weight.grad, conv.bias.grad])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fast_3d_convolutions_equal_conv3d():
    """The stem as a patch matmul, the 1x1 heads as a matmul, the decoder's depthwise conv without the
    taps that only read padding: each equals ``nn.Conv3d``'s own forward, gradients too."""
    from torch import nn

    from sparse_fcmae.models.layers import PatchConv3d, depthwise_nd, pointwise

    stem = PatchConv3d(2, 8, 4, stride=4).double()
    _same_values_and_gradients(stem, stem, (2, 2, 8, 12, 16))
    head = nn.Conv3d(6, 9, 1).double()
    _same_values_and_gradients(head, lambda a: pointwise(head, a), (2, 6, 2, 3, 1))
    dw = nn.Conv3d(6, 6, 7, padding=3, groups=6).double()
    for grid in [(2, 2, 2), (1, 3, 5), (4, 4, 4)]:
        _same_values_and_gradients(dw, lambda a: depthwise_nd(dw, a), (2, 6, *grid))
