"""The compiled kernels on ``--device`` against float64 torch references (marked ``gpu``: the GPU script runs
them with ``pytest -m gpu --device cuda``; here they run on CPU).

Forward and every gradient of both ops, for each dtype the device computes in (CUDA: float32, bfloat16,
float16), the depthwise reference itself against dense float64 ``conv2d``/``conv3d`` at the visible sites
(offset order, kernel layout; 27, 125 and 343 taps), and run-to-run determinism. The GRN cases include a
sample with no rows, an all-zero channel and more channels than the CUDA finalize kernel's 256 threads.
Tables come from ``grid_neighbor_table`` (no MinkowskiEngine), itself checked against ME's here."""
import pytest
import torch
import torch.nn.functional as F
from _util import compiled_path_only  # noqa: F401  (autouse: a fallback to the reference fails the test)

from sparse_fcmae.masking import random_patch_mask, upsample_mask
from sparse_fcmae.ops import (
    batch_segments,
    sparse_depthwise_conv,
    sparse_depthwise_conv_reference,
    sparse_grn,
    sparse_grn_reference,
    transpose_neighbors,
)
from sparse_fcmae.ops.kernel_layout import depthwise_kernel_to_weight, grid_neighbor_table

pytestmark = pytest.mark.gpu

# 4-11x the largest errors seen on an H100 (kernel_check_cuda_h100-2026-11-27.json: fp32 1.8e-7, fp16 3.0e-4,
# bf16 2.4e-3): loose enough for rounding, tight enough that a wrong kernel cannot hide in them
TOL = {torch.float32: 2e-6, torch.float16: 1.5e-3, torch.bfloat16: 1e-2}
# (batch, channels, side, patch scale, kernel size, empty sample, spatial dims)
CASES = [(3, 13, 12, 4, 7, 1, 2), (2, 40, 16, 8, 7, None, 2), (4, 67, 12, 4, 3, 0, 2), (1, 8, 4, 4, 5, None, 2),
         (8, 96, 56, 8, 7, None, 2),
         # volumes: k^3 taps (27, 125, 343), the 343-tap case at an atto stage-1 shape (64^3 volumes, 16^3 sites)
         (2, 13, 8, 4, 3, 1, 3), (2, 40, 12, 4, 5, None, 3), (2, 40, 16, 8, 7, None, 3)]
IDS = [f"B{b}-C{c}-k{k}{'^3' if nd == 3 else ''}" for b, c, _, _, k, _, nd in CASES]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    n = b.norm()
    return float((a - b).norm() / n) if n > 0 else float((a - b).norm())


def grads(fn, inputs, seed=0):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out)
    return [out, *torch.autograd.grad((out * w).sum(), inputs)]


def _case(b, c, side, scale, ks, empty, nd):
    grid = (side // scale,) * nd
    mask = random_patch_mask(b, grid, 0.6, generator=torch.Generator().manual_seed(b + c))
    if empty is not None:
        mask[empty] = 1
    mask_map = upsample_mask(mask, grid, scale)
    table = grid_neighbor_table(mask_map, ks)
    g = torch.Generator().manual_seed(c)
    feats = torch.randn(table.shape[0], c, generator=g, dtype=torch.float64)
    kernel = torch.randn(ks ** nd, c, generator=g, dtype=torch.float64) * 0.2
    bias = torch.randn(1, c, generator=g, dtype=torch.float64)
    return mask_map, table, feats, kernel, bias, g


def pytest_generate_tests(metafunc):
    """dtypes per device: CUDA computes in bfloat16 and float16 too; CPU computes them in float32 (test_kernels.py).
    CUDA checks every set of depthwise kernels (``dw_variant``: 1 scalar, 2 vectorised, 3 vectorised with 4 rows a
    thread at any size); the CPU has one."""
    cuda = torch.device(metafunc.config.getoption("--device")).type == "cuda"
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize("dtype", list(DTYPES) if cuda else ["float32"])
    if "dw_variant" in metafunc.fixturenames:
        metafunc.parametrize("dw_variant", [1, 2, 3] if cuda else [0], ids=lambda v: f"dw{v}" if v else "cpu")
    if "grn_variant" in metafunc.fixturenames:
        metafunc.parametrize("grn_variant", [1, 2] if cuda else [0], ids=lambda v: f"grn{v}" if v else "cpu")


@pytest.fixture
def use_dw_variant(dw_variant):
    """Run the test with that set of CUDA depthwise kernels, then restore the default."""
    if not dw_variant:
        yield
        return
    from sparse_fcmae.ops.backend import extension

    old = extension().set_cuda_dw_variant(dw_variant)
    yield
    extension().set_cuda_dw_variant(old)


@pytest.fixture
def use_grn_variant(grn_variant):
    """Run the test with that set of CUDA GRN kernels, then restore the default."""
    if not grn_variant:
        yield
        return
    from sparse_fcmae.ops.backend import extension

    old = extension().set_cuda_grn_variant(grn_variant)
    yield
    extension().set_cuda_grn_variant(old)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_depthwise_reference_equals_dense_conv_at_the_visible_sites(case):
    """The oracle's oracle: the float64 reference over the table is dense conv2d/conv3d at the visible sites."""
    b, c, side, scale, ks, empty, nd = case
    mask_map, table, feats, kernel, bias, _ = _case(*case)
    coords = torch.nonzero(mask_map < 0.5)
    at = (coords[:, 0], slice(None), *coords[:, 1:].unbind(1))
    dense_in = torch.zeros(b, c, *(side,) * nd, dtype=torch.float64)
    dense_in[at] = feats
    conv = F.conv2d if nd == 2 else F.conv3d
    dense = conv(dense_in, depthwise_kernel_to_weight(kernel, nd), bias.reshape(-1), padding=ks // 2, groups=c)
    assert rel(sparse_depthwise_conv_reference(feats, table, kernel, bias), dense[at]) < 1e-12


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("backward_table", ["symmetric", "transposed"])
def test_depthwise_kernel_matches_the_float64_reference(case, dtype, device, record_property, use_dw_variant,
                                                         backward_table):
    """symmetric: the model's path (the input gradient reverses the taps over the same table); transposed: over
    the transposed table, the path for any other map."""
    dt = DTYPES[dtype]
    _, table, feats, kernel, bias, _ = _case(*case)
    tab = table.to(device)
    tab_t = None if backward_table == "symmetric" else transpose_neighbors(tab)
    sym = backward_table == "symmetric"
    ins = [feats.to(device, dt), kernel.to(device, torch.float32), bias.to(device, torch.float32)]
    outs = grads(lambda f, w, bb: sparse_depthwise_conv(f, tab, w, bb, tab_t, symmetric=sym), ins)
    # low precision: the reference on the same rounded inputs
    ref = grads(lambda f, w, bb: sparse_depthwise_conv_reference(f, table, w, bb), [ins[0].double().cpu(), kernel, bias])
    errs = {name: rel(o, r) for name, o, r in zip(["out", "d_feats", "d_kernel", "d_bias"], outs, ref)}
    record_property("rel_err", errs)
    assert all(e <= TOL[dt] for e in errs.values()), errs
    again = grads(lambda f, w, bb: sparse_depthwise_conv(f, tab, w, bb, tab_t, symmetric=sym), ins)
    assert all(torch.equal(x, y) for x, y in zip(outs, again)), "not deterministic run to run"
    # without a bias (the CUDA weight gradient folds the bias gradient in only when there is one)
    outs = grads(lambda f, w: sparse_depthwise_conv(f, tab, w, None, tab_t, symmetric=sym), ins[:2])
    ref = grads(lambda f, w: sparse_depthwise_conv_reference(f, table, w, None), [ins[0].double().cpu(), kernel])
    errs = {name: rel(o, r) for name, o, r in zip(["out", "d_feats", "d_kernel"], outs, ref)}
    assert all(e <= TOL[dt] for e in errs.values()), errs


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_grn_kernel_matches_the_float64_reference(case, dtype, device, record_property, use_grn_variant):
    dt = DTYPES[dtype]
    b, c = case[0], case[1]
    mask_map, _, _, _, _, g = _case(*case)
    batch = torch.nonzero(mask_map < 0.5)[:, 0]
    x = torch.randn(batch.shape[0], 4 * c, generator=g, dtype=torch.float64) * 2
    x[:, 1] = 0  # an all-zero channel: its norm is 0 and no gradient may come through gamma (no 0/0)
    gamma = torch.randn(1, 4 * c, generator=g, dtype=torch.float64)
    beta = torch.randn(1, 4 * c, generator=g, dtype=torch.float64)
    bd = batch.to(device)
    seg = batch_segments(bd, b)
    ins = [x.to(device, dt), gamma.to(device, torch.float32), beta.to(device, torch.float32)]
    outs = grads(lambda a, gm, bt: sparse_grn(a, bd, b, gm, bt, segments=seg), ins)
    ref = grads(lambda a, gm, bt: sparse_grn_reference(a, batch, b, gm, bt), [ins[0].double().cpu(), gamma, beta])
    errs = {name: rel(o, r) for name, o, r in zip(["out", "d_x", "d_gamma", "d_beta"], outs, ref)}
    record_property("rel_err", errs)
    assert all(e <= TOL[dt] * (2 if n == "d_gamma" else 1) for n, e in errs.items()), errs
    again = grads(lambda a, gm, bt: sparse_grn(a, bd, b, gm, bt, segments=seg), ins)
    assert all(torch.equal(p, q) for p, q in zip(outs, again)), "not deterministic run to run"


@pytest.mark.parametrize("nd,kernel_size", [(2, 7), (2, 3), (3, 5)])
def test_grid_table_equals_minkowskiengines(nd, kernel_size):
    """The ME-free table used above is ME's own neighbour table at stage 1 (same rows, same offset order)."""
    from sparse_fcmae.sparse import neighbor_table, to_sparse

    grid = (3, 2, 2)[:nd]
    mask = random_patch_mask(3, grid, 0.5, generator=torch.Generator().manual_seed(nd))
    mask[1] = 1  # a sample with no rows
    mask_map = upsample_mask(mask, grid, 4)
    x = to_sparse(torch.randn(3, 2, *(g * 4 for g in grid)), mask_map)
    assert torch.equal(grid_neighbor_table(mask_map, kernel_size), neighbor_table(x, kernel_size))
