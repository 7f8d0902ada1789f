"""The sparse encoder under torch.compile: the kernels as custom ops, the graph path (plain tensors, static shapes)
as one graph of the whole step, same results as the MinkowskiEngine path."""
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


def _encoder(size: str = "atto", **kw) -> SparseConvNeXtV2:
    torch.manual_seed(0)
    enc = SparseConvNeXtV2(size, **kw)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if ".grn." in name:  # zero at init: make GRN do real work
                p.normal_(0.0, 0.1)
    return enc


def _outputs(enc, fn, x, mask) -> tuple[torch.Tensor, dict]:
    enc.zero_grad()
    y = fn(x, mask)
    (y * torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape)).sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in enc.named_parameters()}


@pytest.mark.parametrize("spatial_dims,img,kernel_size,ratio", [
    (2, 96, 7, 0.6), (2, 64, 3, 0.5), (2, 64, 5, 0.75),  # 0.75 of 4 patches: one visible patch per sample
    (3, 64, 7, 0.75), (3, 64, 3, 0.5),
])
@pytest.mark.gpu
def test_graph_path_equals_minkowski_path(spatial_dims, img, kernel_size, ratio, device):
    """The graph path (plain tensors, static shapes) gives the MinkowskiEngine path's output and every parameter's
    gradient, on the same masks; images and volumes, every kernel size. Bitwise on CPU; on CUDA MinkowskiEngine
    may order a strided map's rows otherwise, which reorders GRN's sums (rounding only)."""
    from sparse_fcmae.masking import num_kept

    enc = _encoder(in_chans=2, kernel_size=kernel_size, spatial_dims=spatial_dims).to(device)
    grid = (img // 32,) * spatial_dims
    x = torch.randn(3, 2, *(img,) * spatial_dims).to(device)
    mask = random_patch_mask(3, grid, ratio, generator=torch.Generator().manual_seed(1)).to(device)
    keep = num_kept(mask.shape[1], ratio)
    y0, g0 = _outputs(enc, enc.forward_features, x, mask)
    y1, g1 = _outputs(enc, lambda a, m: enc.forward_graph(a, m, keep), x, mask)
    same = torch.equal if device.type == "cpu" else (lambda a, b: rel_err(a, b) < 1e-4)
    assert same(y0, y1)
    for name, g in g0.items():
        assert same(g1[name], g), name
    assert y0.abs().amax() > 0 and all(g.abs().amax() > 0 for n, g in g0.items() if not n.endswith("grn.beta"))


def test_graph_path_waits_for_no_host():
    """No op of the graph path's forward and backward has a data-dependent size or reads a value back
    (``nonzero``, ``unique``, ``item``, ...): what lets CUDA graphs capture it. The MinkowskiEngine path has some."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    host = {"nonzero", "unique", "_unique2", "unique_dim", "unique_consecutive", "_local_scalar_dense", "item",
            "masked_select", "bincount", "repeat_interleave"}
    enc = _encoder(in_chans=3)
    x = torch.randn(2, 3, 64, 96)
    mask = random_patch_mask(2, (2, 3), 0.5, generator=torch.Generator().manual_seed(1))
    for graph, expect_host in ((True, False), (False, True)):
        with Ops() as ops:
            y = enc.forward_graph(x, mask, 3) if graph else enc.forward_features(x, mask)
            y.sum().backward()
        assert bool(ops.names & host) == expect_host, (graph, ops.names & host)


def test_graph_path_rejects_another_visible_count():
    enc = _encoder(in_chans=3).use_graph()
    x = torch.randn(2, 3, 64, 64)
    mask = random_patch_mask(2, (2, 2), 0.5)
    mask[1, :] = 0.0  # sample 1 shows all 4 patches, sample 0 two
    with pytest.raises(ValueError, match=r"needs 2 visible patches in every sample.*\[2, 4\]"):
        enc.forward_features(x, mask, num_visible=2)
    enc.forward_features(x, random_patch_mask(2, (2, 2), 0.5), num_visible=2)  # the right count runs


def test_compiled_step_is_one_graph_and_equals_eager():
    """``torch.compile(fullgraph=True)`` of the whole FCMAE forward on the graph path: no graph break, one
    compilation for every mask at the ratio, loss and every gradient as the eager MinkowskiEngine model."""
    import copy

    from torch._dynamo.utils import counters

    from sparse_fcmae.models import FCMAE

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = FCMAE("atto", in_chans=3, mask_ratio=0.6)
    with torch.no_grad():
        for name, p in eager.named_parameters():
            if ".grn." in name:
                p.normal_(0.0, 0.1)
    graph = copy.deepcopy(eager)
    graph.encoder.use_graph()
    assert torch._dynamo.config.recompile_limit >= 64  # a sweep over mask ratios stays compiled
    step = torch.compile(graph, fullgraph=True)
    x = torch.randn(2, 3, 96, 96)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):  # new masks (and rows) every step, the same count
        mask = random_patch_mask(2, (3, 3), 0.6, generator=gen)
        losses = []
        for model, fn in ((eager, eager), (graph, step)):
            model.zero_grad()
            loss = fn(x, mask)[0]
            loss.backward()
            losses.append(loss.detach())
        assert rel_err(losses[1], losses[0]) < 1e-5
        for (name, p), q in zip(eager.named_parameters(), graph.parameters()):
            assert rel_err(q.grad, p.grad) < 1e-4, name
    assert counters["stats"]["unique_graphs"] == 1  # one forward graph, compiled once
    assert not counters["graph_break"], dict(counters["graph_break"])
