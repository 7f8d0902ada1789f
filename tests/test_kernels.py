"""The compiled kernels (sparse_fcmae._C) against the pure-torch references and float64 gradcheck."""
import warnings

import MinkowskiEngine as ME
import pytest
import torch
from _util import rel_err

from sparse_fcmae.masking import random_patch_mask, upsample_mask
from sparse_fcmae.ops import (
    backend,
    batch_segments,
    extension_available,
    sparse_depthwise_conv,
    sparse_depthwise_conv_reference,
    sparse_grn,
    sparse_grn_reference,
    transpose_neighbors,
)
from sparse_fcmae.ops.depthwise import SparseDepthwiseConvFunction
from sparse_fcmae.ops.grn import SparseGRNFunction
from sparse_fcmae.sparse import neighbor_table, to_sparse


@pytest.fixture(autouse=True)
def _compiled_path_only(request, monkeypatch):
    """Every test here compares the compiled kernels with an oracle: a silent fallback to the reference
    (extension missing, SPARSE_FCMAE_KERNELS=0) would compare the reference with itself. So the fallback
    raises, except in the test of the fallback itself; the oracles are this module's own imports."""
    if request.node.name.startswith("test_forced_fallback"):
        return

    def taken(*a, **k):
        raise AssertionError("the pure-torch fallback ran instead of the compiled kernel")

    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    import sparse_fcmae.ops.depthwise as dw_mod
    import sparse_fcmae.ops.grn as grn_mod

    monkeypatch.setattr(grn_mod, "sparse_grn_reference", taken)
    monkeypatch.setattr(dw_mod, "sparse_depthwise_conv_reference", taken)


def test_extension_is_built():
    assert extension_available(), "sparse_fcmae._C is missing: build it (pip install -e . / setup.py build_ext)"


def _grads(fn, *inputs):
    """Output and gradients of a random projection of ``fn(*inputs)`` w.r.t. every input."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # same for every fn
    w = w.to(out.device, out.dtype)
    grads = torch.autograd.grad((out * w).sum(), inputs)
    return out, grads


# ------------------------------------------------------------------------------------------------ GRN
def _grn_case(n_per_sample, c, dtype=torch.float32, shuffle=True):
    batch = torch.cat([torch.full((k,), b) for b, k in enumerate(n_per_sample)]).long()
    if shuffle:  # rows of a sample need not be contiguous
        batch = batch[torch.randperm(batch.numel())]
    x = torch.randn(batch.numel(), c, dtype=dtype) * 2
    gamma = torch.randn(1, c, dtype=dtype)
    beta = torch.randn(1, c, dtype=dtype)
    return x, batch, len(n_per_sample), gamma, beta


def test_grn_gradcheck_float64_empty_sample_zero_channel_unsorted_rows():
    x, batch, b, gamma, beta = _grn_case([4, 0, 5, 3], 6, torch.float64)
    x[:, 2] = 0.0  # zero everywhere: n = 0 and a finite gradient, as in the reference
    x.requires_grad_()
    gamma.requires_grad_()
    beta.requires_grad_()

    def fn(a, g, bb):
        return sparse_grn(a, batch, b, g, bb)

    assert fn(x, gamma, beta).grad_fn.name().startswith("SparseGRNFunction")
    torch.autograd.gradcheck(fn, (x, gamma, beta))
    out, grads = _grads(fn, x, gamma, beta)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    "n_per_sample,c",
    [([1], 1), ([1], 7), ([37, 0, 12, 1], 13), ([300, 211], 160), ([50, 64, 0], 67)],
)
def test_grn_matches_reference_fp32(n_per_sample, c):
    x, batch, b, gamma, beta = _grn_case(n_per_sample, c)
    out, grads = _grads(lambda a, g, bb: sparse_grn(a, batch, b, g, bb), x, gamma, beta)
    ref, ref_grads = _grads(lambda a, g, bb: sparse_grn_reference(a, batch, b, g, bb), x, gamma, beta)
    assert rel_err(out, ref) < 1e-6
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-5


def test_grn_non_contiguous_inputs_and_cached_segments():
    x, batch, b, gamma, beta = _grn_case([20, 9, 30], 24)
    x_nc = torch.randn(24, x.shape[0]).t()  # (N, C) with strides (1, N)
    gamma_nc = torch.randn(24, 2)[:, 0]
    assert not x_nc.is_contiguous() and not gamma_nc.is_contiguous()
    seg = batch_segments(batch, b)
    out = sparse_grn(x_nc, batch, b, gamma_nc, beta, segments=seg)
    ref = sparse_grn_reference(x_nc, batch, b, gamma_nc, beta)
    assert rel_err(out, ref) < 1e-6


@pytest.mark.parametrize("eps", [1e-6, 0.3])
def test_grn_float64_matches_reference_tightly_eps_added_to_the_mean(eps):
    """float64 against the reference to rounding: with a large eps, eps's place (mean_c g + eps) shows."""
    x, batch, b, gamma, beta = _grn_case([9, 0, 17, 1, 6], 37, torch.float64)
    x[batch == 2, 5] = 0.0  # a channel that is zero in one sample only
    out, grads = _grads(lambda a, g, bb: sparse_grn(a, batch, b, g, bb, eps=eps), x, gamma, beta)
    ref, ref_grads = _grads(lambda a, g, bb: sparse_grn_reference(a, batch, b, g, bb, eps=eps), x, gamma, beta)
    assert rel_err(out, ref) < 1e-12
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-12


# ------------------------------------------------------------------------------ depthwise convolution
def _sparse_case(b=3, grid=(3, 4), scale=4, c=13, empty_sample=None, ratio=0.5):
    mask = random_patch_mask(b, grid, ratio)
    if empty_sample is not None:
        mask[empty_sample] = 1  # a sample with zero points
    mask_map = upsample_mask(mask, grid, scale)
    x = torch.randn(b, c, grid[0] * scale, grid[1] * scale)
    return to_sparse(x, mask_map)


def test_me_submanifold_table_is_its_own_flip_transpose():
    s = _sparse_case(c=4)
    table = neighbor_table(s, 7)
    assert table.dtype == torch.int32
    assert (table >= 0).sum() > table.shape[0]  # the sites have real neighbours
    # offset k from i to j <=> offset K-1-k from j to i: what symmetric=True (no transposed table) relies on
    assert torch.equal(transpose_neighbors(table), table.flip(1))


def test_depthwise_gradcheck_float64_on_me_neighbours():
    s = _sparse_case(b=2, grid=(2, 2), scale=3, c=3, empty_sample=1)
    table = neighbor_table(s, 5)
    feats = s.F.double().requires_grad_()
    kernel = torch.randn(25, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)

    def fn(f, w, bb):
        return sparse_depthwise_conv(f, table, w, bb, symmetric=True)

    assert fn(feats, kernel, bias).grad_fn.name().startswith("SparseDepthwiseConvFunction")
    torch.autograd.gradcheck(fn, (feats, kernel, bias))


def test_depthwise_gradcheck_float64_generic_table_without_bias():
    # any table whose columns are injective (what a convolution map is), not just a submanifold one
    n, k, c = 9, 4, 5
    table = torch.stack([torch.randperm(n + 3)[:n] - 3 for _ in range(k)], 1).clamp(min=-1)
    feats = torch.randn(n, c, dtype=torch.float64, requires_grad=True)
    kernel = torch.randn(k, c, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda f, w: sparse_depthwise_conv(f, table, w, None), (feats, kernel))
    ref = sparse_depthwise_conv_reference(feats, table, kernel, None)
    assert rel_err(sparse_depthwise_conv(feats, table, kernel, None), ref) < 1e-12


@pytest.mark.parametrize(
    "kernel_size,c,empty",
    [(7, 13, 1), (7, 40, None), (3, 67, 0), (5, 1, None), (7, 96, 2), (1, 9, None)],
)
def test_depthwise_matches_reference_fp32(kernel_size, c, empty):
    s = _sparse_case(c=c, empty_sample=empty)
    table = neighbor_table(s, kernel_size)
    kernel = torch.randn(kernel_size ** 2, c)
    bias = torch.randn(1, c)
    out, grads = _grads(lambda f, w, bb: sparse_depthwise_conv(f, table, w, bb, symmetric=True), s.F, kernel, bias)
    ref, ref_grads = _grads(lambda f, w, bb: sparse_depthwise_conv_reference(f, table, w, bb), s.F, kernel, bias)
    assert rel_err(out, ref) < 1e-6
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-5


@pytest.mark.parametrize("cap", [0, 1, 2])
def test_every_cpu_copy_of_the_depthwise_kernel_matches_the_reference(cap):
    # the machine runs only its best copy by default; capping the ISA exercises the others here
    from sparse_fcmae import _C

    s = _sparse_case(c=45)  # 45 = 32 + 8 + 5: every tile width and the scalar tail
    table = neighbor_table(s, 7)
    kernel, bias = torch.randn(49, 45), torch.randn(1, 45)
    old = _C.set_cpu_isa_cap(cap)
    try:
        out, grads = _grads(lambda f, w, bb: sparse_depthwise_conv(f, table, w, bb, symmetric=True), s.F, kernel, bias)
        out64, grads64 = _grads(
            lambda f, w, bb: sparse_depthwise_conv(f, table, w, bb, symmetric=True), s.F.double(), kernel.double(), bias.double()
        )
    finally:
        _C.set_cpu_isa_cap(old)
    ref, ref_grads = _grads(lambda f, w, bb: sparse_depthwise_conv_reference(f, table, w, bb), s.F.double(), kernel.double(), bias.double())
    assert rel_err(out, ref) < 1e-6 and rel_err(out64, ref) < 1e-12
    for g, g64, r in zip(grads, grads64, ref_grads):
        assert rel_err(g, r) < 1e-5 and rel_err(g64, r) < 1e-12


def test_depthwise_single_point_and_non_contiguous_inputs():
    coords = torch.tensor([[0, 5, 7]], dtype=torch.int32)
    s = ME.SparseTensor(torch.randn(1, 11), coordinates=coords)
    table = neighbor_table(s, 7)
    assert table.shape == (1, 49) and (table >= 0).sum() == 1  # only itself
    feats = torch.randn(11, 1).t()  # (1, 11), non-contiguous
    kernel = torch.randn(11, 49).t()  # (49, 11), non-contiguous
    bias = torch.randn(11, 3)[:, 1]
    out = sparse_depthwise_conv(feats, table, kernel, bias, symmetric=True)
    assert rel_err(out, feats * kernel[24] + bias) < 1e-6  # the centre tap

    s = _sparse_case(c=30)
    table = neighbor_table(s, 7)
    feats = torch.randn(60, s.F.shape[0]).t()[:, ::2]
    assert not feats.is_contiguous()
    kernel = torch.randn(49, 30)
    out = sparse_depthwise_conv(feats, table, kernel, None, symmetric=True)
    assert rel_err(out, sparse_depthwise_conv_reference(feats, table, kernel, None)) < 1e-6


def test_cpu_kernels_are_deterministic_across_thread_counts():
    s = _sparse_case(b=4, grid=(4, 4), scale=8, c=40, ratio=0.6)
    table = neighbor_table(s, 7)
    kernel, bias = torch.randn(49, 40), torch.randn(1, 40)
    batch = s.C[:, 0].long()
    gamma, beta = torch.randn(1, 40), torch.randn(1, 40)

    def run():
        (out, grads) = _grads(lambda f, w, bb: sparse_depthwise_conv(f, table, w, bb, symmetric=True), s.F, kernel, bias)
        (gout, ggrads) = _grads(lambda f, g, bb: sparse_grn(f, batch, 4, g, bb), s.F, gamma, beta)
        return [out, *grads, gout, *ggrads]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.manual_seed(1)
        one = run()
        torch.set_num_threads(max(2, threads))
        torch.manual_seed(1)
        many = run()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


def test_bad_table_is_rejected():
    feats = torch.randn(4, 3)
    table = torch.tensor([[0, 1], [1, 2], [2, 4], [3, -1]], dtype=torch.int32)  # 4 is out of range
    with pytest.raises(ValueError, match=r"outside \[-1, N\) with N = 4 rows \(min -1, max 4\)"):
        sparse_depthwise_conv(feats, table, torch.randn(2, 3), None, table)


# ------------------------------------------------------------------------------------ use and fallback
def test_model_runs_through_the_compiled_kernels():
    from sparse_fcmae.models import SparseConvNeXtV2

    model = SparseConvNeXtV2("atto")
    x = torch.randn(2, 3, 64, 64)
    out = model(x, random_patch_mask(2, (2, 2), 0.5))
    seen, stack = set(), [out.grad_fn]
    while stack:  # walk the autograd graph
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        stack.extend(f for f, _ in fn.next_functions)
    names = {fn.name() for fn in seen}
    assert any(n.startswith("SparseDepthwiseConvFunction") for n in names)
    assert any(n.startswith("SparseGRNFunction") for n in names)


def test_forced_fallback_warns_once_and_uses_the_reference(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "0")
    backend.reset_warning()
    x, batch, b, gamma, beta = _grn_case([5, 4], 6)
    table = torch.tensor([[0, -1], [1, 0], [2, 1], [3, 2], [4, 3], [5, 4], [6, 5], [7, 6], [8, 7]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = sparse_grn(x.requires_grad_(), batch, b, gamma, beta)
        z = sparse_depthwise_conv(x, table, torch.randn(2, 6), None)
        sparse_grn(x, batch, b, gamma, beta)
    ours = [w for w in caught if "reference ops" in str(w.message)]
    assert len(ours) == 1 and "SPARSE_FCMAE_KERNELS=0" in str(ours[0].message)
    assert not isinstance(y.grad_fn, SparseGRNFunction) and not y.grad_fn.name().startswith("SparseGRN")
    assert not z.grad_fn.name().startswith(SparseDepthwiseConvFunction.__name__)
    assert rel_err(y, sparse_grn_reference(x, batch, b, gamma, beta)) == 0
    backend.reset_warning()


def test_bfloat16_cpu_features_are_computed_in_float32():
    """CPU autocast hands the ops bf16 features: the result must match the fp32 op rounded to bf16."""
    from sparse_fcmae.ops import sparse_depthwise_conv, sparse_grn

    torch.manual_seed(0)
    n, c, k = 12, 5, 9
    feats = torch.randn(n, c)
    table = torch.randint(-1, n, (n, k))
    kernel, bias = torch.randn(k, c), torch.randn(1, c)
    out = sparse_depthwise_conv(feats.bfloat16(), table, kernel, bias)
    assert out.dtype == torch.bfloat16
    expected = sparse_depthwise_conv(feats.bfloat16().float(), table, kernel, bias)
    assert torch.equal(out, expected.bfloat16())
    batch = torch.tensor([0] * 5 + [1] * 7)
    g = sparse_grn(feats.bfloat16(), batch, 2, torch.randn(1, c), torch.randn(1, c))
    assert g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all()


def test_the_cuda_grn_kernel_choice_is_checked(monkeypatch):
    """``SPARSE_FCMAE_CUDA_GRN`` / ``set_cuda_grn_variant``: 1 or 2 pick a set of CUDA GRN kernels, else an error."""
    from sparse_fcmae.ops import backend

    ext = backend.extension()
    with pytest.raises(RuntimeError, match="1 or 2"):
        ext.set_cuda_grn_variant(3)
    monkeypatch.setenv(backend.CUDA_GRN_VAR, "fused")
    with pytest.raises(ValueError, match="SPARSE_FCMAE_CUDA_GRN must be 1"):
        backend._apply_cuda_grn_variant(ext)
    monkeypatch.setenv(backend.CUDA_GRN_VAR, "1")
    backend._apply_cuda_grn_variant(ext)
    assert ext.set_cuda_grn_variant(2) == 1  # the variable took effect; the default restored


def test_the_cuda_depthwise_kernel_choice_is_checked(monkeypatch):
    """``SPARSE_FCMAE_CUDA_DW`` / ``set_cuda_dw_variant``: 1-3 pick a set of CUDA kernels, anything else is an error."""
    from sparse_fcmae.ops import backend

    ext = backend.extension()
    with pytest.raises(RuntimeError, match="1, 2 or 3"):
        ext.set_cuda_dw_variant(4)
    monkeypatch.setenv(backend.CUDA_DW_VAR, "v9")
    with pytest.raises(ValueError, match="SPARSE_FCMAE_CUDA_DW must be 1"):
        backend._apply_cuda_dw_variant(ext)
    monkeypatch.setenv(backend.CUDA_DW_VAR, "1")
    backend._apply_cuda_dw_variant(ext)
    assert ext.set_cuda_dw_variant(2) == 1  # the variable took effect; the default restored
