"""The sparse encoder under torch.compile: the kernels as custom ops, each stage one graph, same results."""
from __future__ import annotations

import pytest
import torch
from _util import rel_err

from sparse_fcmae.masking import random_patch_mask
from sparse_fcmae.models import SparseConvNeXtV2
from sparse_fcmae.ops import backend, batch_segments, transpose_neighbors

pytestmark = pytest.mark.skipif(not backend.extension_available(), reason="needs the compiled kernels")


def _table(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """A valid convolution map: each offset moves distinct rows to distinct rows (some absent)."""
    g = torch.Generator().manual_seed(seed)
    nbr = torch.stack([torch.randperm(n, generator=g) for _ in range(k)], 1).to(torch.int32)
    nbr[torch.rand(n, k, generator=g) < 0.3] = -1
    return nbr


@pytest.mark.gpu
@pytest.mark.parametrize("c", [5, 6])  # 6: a channel count the vectorised CUDA gather takes (float64: 2 a vector)
def test_custom_ops_pass_opcheck(c, device):
    """Schemas, fake kernels (shapes/dtypes for tracing), autograd registrations and the ops' outputs (no output
    may alias an input or another output) are consistent, on --device (the CUDA kernels differ from the CPU's)."""
    torch.manual_seed(0)
    n, k = 12, 9
    nbr = _table(n, k).to(device)
    f = torch.randn(n, c, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(k, c, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(1, c, dtype=torch.float64, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.sparse_fcmae.dwconv.default, (f, nbr, transpose_neighbors(nbr), w, b))
    torch.library.opcheck(torch.ops.sparse_fcmae.dwconv.default, (f, nbr, transpose_neighbors(nbr), w, None))
    go = torch.randn(n, c, dtype=torch.float64, device=device)
    for with_bias in (True, False):
        torch.library.opcheck(torch.ops.sparse_fcmae.dwconv_backward.default,
                              (go, f.detach(), nbr, transpose_neighbors(nbr), w.detach(), with_bias))
    batch = torch.tensor([0, 2, 2, 0, 0, 2, 2, 0, 2, 0, 0, 2], device=device)  # sample 1 is empty
    perm, off = batch_segments(batch, 3)
    gamma = torch.randn(1, c, dtype=torch.float64, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.sparse_fcmae.grn.default, (f, batch, perm, off, gamma, b, 1e-6))


@pytest.mark.gpu
def test_symmetric_table_gradients_are_exact(device):
    """No transposed table (``nbr_t`` None, the model's path): the input gradient reverses the taps over the
    table itself, exact for a submanifold table (finite differences in float64), on --device."""
    from sparse_fcmae.ops.kernel_layout import grid_neighbor_table

    mask_map = torch.zeros(2, 5, 4)
    mask_map[0, 1:3, 2:] = 1  # some sites masked: absent neighbours
    nbr = grid_neighbor_table(mask_map, 3).to(device)
    n = nbr.shape[0]
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(s, generator=g, dtype=torch.float64).to(device).requires_grad_() for s in ((n, 6), (9, 6), (1, 6))]
    assert torch.autograd.gradcheck(lambda f, w, b: torch.ops.sparse_fcmae.dwconv(f, nbr, None, w, b), args)
    torch.library.opcheck(torch.ops.sparse_fcmae.dwconv.default, (args[0], nbr, None, args[1], args[2]))


def test_custom_ops_gradients_are_exact():
    torch.manual_seed(0)
    n, c, k = 20, 4, 9
    nbr = _table(n, k, seed=1)
    nbr_t = transpose_neighbors(nbr)
    args = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in ((n, c), (k, c), (1, c))]
    assert torch.autograd.gradcheck(lambda f, w, b: torch.ops.sparse_fcmae.dwconv(f, nbr, nbr_t, w, b), args)
    batch = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(2))
    perm, off = batch_segments(batch, 3)
    args = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in ((n, c), (1, c), (1, c))]
    assert torch.autograd.gradcheck(lambda x, g, b: torch.ops.sparse_fcmae.grn(x, batch, perm, off, g, b, 1e-6)[0], args)


def test_compiled_stages_equal_eager_without_graph_breaks():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    enc = SparseConvNeXtV2("atto", in_chans=3)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if ".grn." in name:  # zero at init: make GRN do real work
                p.normal_(0.0, 0.1)
    x = torch.randn(3, 3, 64, 64)
    mask = random_patch_mask(3, (2, 2), 0.5, generator=torch.Generator().manual_seed(1))
    mask[2] = 1.0  # a fully masked sample: no rows in any stage
    outs = []
    for compiled in (False, True):
        if compiled:
            enc.compile_stages()
        enc.zero_grad()
        y = enc.forward_features(x, mask)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        outs.append((y.detach(), {n: p.grad.clone() for n, p in enc.named_parameters()}))
    assert rel_err(outs[1][0], outs[0][0]) < 1e-5
    for name, g in outs[0][1].items():
        if g.abs().max() > 0:
            assert rel_err(outs[1][1][name], g) < 1e-4, name
    assert counters["stats"]["unique_graphs"] == 4  # one graph per stage
    assert not counters["graph_break"], dict(counters["graph_break"])
