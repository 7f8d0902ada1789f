"""The kernels' argument checks: every tensor on the features' device, sizes (one clear error each); the public ops'
table and segment checks (once, not per kernel call), and the kernels' memory safety without them."""

import MinkowskiEngine as ME
import pytest
import torch
from _util import rel_err
from test_kernels import _compiled_path_only, _grads, _grn_case  # noqa: F401  (_compiled_path_only: autouse)

from sparse_fcmae.ops import (
    backend,
    batch_segments,
    checks,
    sparse_depthwise_conv,
    sparse_depthwise_conv_reference,
    sparse_grn,
    sparse_grn_reference,
)
from sparse_fcmae.ops.kernel_layout import grid_neighbor_table
from sparse_fcmae.sparse import neighbor_table


def _grn_ext_args(n_per_sample=(5, 0, 4), c=6):
    x, batch, b, gamma, beta = _grn_case(list(n_per_sample), c)
    perm, offsets = batch_segments(batch, b)
    return x, batch, perm, offsets, gamma, beta


def test_grn_beta_with_wrong_size_is_rejected():
    x, batch, b, gamma, beta = _grn_case([5, 4], 6)
    with pytest.raises(RuntimeError, match=r"beta must have C = 6 elements, got 7"):
        sparse_grn(x, batch, b, gamma, torch.randn(1, 7))


def test_grn_backward_with_wrong_g_shape_is_rejected():
    x, batch, perm, offsets, gamma, beta = _grn_ext_args()
    ext = backend.extension()
    with pytest.raises(RuntimeError, match=r"g must be \(B, C\) = \(3, 6\)"):
        ext.grn_backward(torch.ones_like(x), x, batch, perm, offsets, gamma, torch.ones(2, 6), 1e-6)


@pytest.mark.parametrize("name", ["batch", "perm", "offsets", "gamma", "beta", "grad_out", "g"])
def test_grn_tensor_on_another_device_is_rejected(name):
    """One clear error, before any data is read: 'meta' stands in for a second device on a CPU-only machine."""
    x, batch, perm, offsets, gamma, beta = _grn_ext_args()
    ext = backend.extension()
    _, g = ext.grn_forward(x, batch, perm, offsets, gamma, beta, 1e-6)
    t = dict(batch=batch, perm=perm, offsets=offsets, gamma=gamma, beta=beta, grad_out=torch.ones_like(x), g=g)
    t[name] = t[name].to("meta")
    msg = f"every tensor must be on x's device \\(cpu\\), but {name} is on meta"
    if name not in ("grad_out", "g"):  # a forward argument
        with pytest.raises(RuntimeError, match=msg):
            ext.grn_forward(x, t["batch"], t["perm"], t["offsets"], t["gamma"], t["beta"], 1e-6)
    if name != "beta":  # a backward argument
        with pytest.raises(RuntimeError, match=msg):
            ext.grn_backward(t["grad_out"], x, t["batch"], t["perm"], t["offsets"], t["gamma"], t["g"], 1e-6)


def _dw_ext_args(n=7, c=5, k=9):
    torch.manual_seed(0)
    feats = torch.randn(n, c, dtype=torch.float64)
    nbr = torch.randint(-1, n, (n, k), dtype=torch.int32)
    return feats, nbr, torch.randn(k, c, dtype=torch.float64), torch.randn(c, dtype=torch.float64)


@pytest.mark.parametrize("name", ["nbr", "weight", "bias", "nbr_t", "grad_out"])
def test_dwconv_tensor_on_another_device_is_rejected(name):
    """Every tensor must be on the features' device: the backend is picked from the features alone, so a
    CUDA table with CPU features would otherwise be read as host memory. 'meta' stands in for a second device."""
    feats, nbr, weight, bias = _dw_ext_args()
    ext = backend.extension()
    t = dict(nbr=nbr, weight=weight, bias=bias, nbr_t=nbr.clone(), grad_out=torch.ones_like(feats))
    t[name] = t[name].to("meta")
    said = {"nbr": "the neighbour table", "nbr_t": "the transposed table"}.get(name, name)
    msg = f"dwconv: every tensor must be on feats's device \\(cpu\\), but {said} is on meta"
    if name in ("nbr", "weight", "bias"):
        with pytest.raises(RuntimeError, match=msg):
            ext.dwconv_forward(feats, t["nbr"], t["weight"], t["bias"])
    if name != "bias":
        with pytest.raises(RuntimeError, match=msg):
            ext.dwconv_backward(t["grad_out"], feats, t["nbr"], t["nbr_t"], t["weight"], True, True, True)


def test_dwconv_bias_with_wrong_size_is_rejected():
    feats, nbr, weight, _ = _dw_ext_args()
    with pytest.raises(RuntimeError, match=r"bias must have C = 5 elements, got 6"):
        backend.extension().dwconv_forward(feats, nbr, weight, torch.randn(6, dtype=torch.float64))


# ---- index checks: once in the public op (validate=True), never in the kernels, which stay memory-safe ----
# Mutants (issue 16 "validate once"): the CPU kernels' unsigned compare back to `j >= 0` -> the unchecked tests
# read outside the features (wrong values or a crash); the public op's check dropped -> the error tests fail.
BAD_ENTRIES = [7, 8, 1000, 2**30, 2**31 - 1, -2, -(2**31)]  # N = 7: one past the end, far past, negative


def _bad_table(bad):
    """``(table, clean)``: the 3x3 table of 7 sites on a 3x3 grid (a real map: each column hits a row at most
    once, so it has a transpose) with one bad entry and every -1 of row 5 bad too; ``clean``: those entries -1."""
    mask_map = torch.zeros(1, 3, 3)
    mask_map[0, 0, 1] = mask_map[0, 2, 2] = 1
    nbr = grid_neighbor_table(mask_map, 3)
    n = nbr.shape[0]
    assert n == 7 and (nbr[5] == -1).any()
    nbr[3, 2] = bad
    nbr[5][nbr[5] == -1] = bad
    return nbr, torch.where((nbr < 0) | (nbr >= n), torch.full_like(nbr, -1), nbr)


@pytest.mark.parametrize("table_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("bad", [7, 2**30, -2])
def test_dwconv_bad_table_through_the_public_op_is_one_clear_error(bad, table_dtype, monkeypatch):
    monkeypatch.delenv(checks.CHECK_VAR, raising=False)
    feats, _, weight, bias = _dw_ext_args()
    nbr, _ = _bad_table(bad)
    with pytest.raises(ValueError, match=r"^sparse_depthwise_conv: the neighbour table has entries outside \[-1, N\) "
                       r"with N = 7 rows \(min -?\d+, max \d+\); -1 marks an absent neighbour$"):
        sparse_depthwise_conv(feats, nbr.to(table_dtype), weight, bias, symmetric=True)
    with pytest.raises(ValueError, match="the transposed table has entries outside"):
        sparse_depthwise_conv(feats, _bad_table(-1)[1], weight, bias, nbr.to(table_dtype))


def test_dwconv_int64_entry_past_int32_is_caught_before_the_cast():
    """2**32 would wrap to row 0 in the int32 table the kernels read: the check sees the caller's int64 table."""
    feats, _, weight, bias = _dw_ext_args()
    nbr = _bad_table(-1)[1].long()
    nbr[2, 4] = 2**32
    with pytest.raises(ValueError, match="max 4294967296"):
        sparse_depthwise_conv(feats, nbr, weight, bias, symmetric=True)


@pytest.mark.parametrize("dtype,c", [(torch.float64, 5), (torch.float32, 37)])  # vector tiles and the scalar tail
@pytest.mark.parametrize("bad", BAD_ENTRIES)
def test_dwconv_bad_table_unchecked_counts_as_absent(bad, dtype, c, monkeypatch):
    """validate=False: no error, no read out of bounds; the result is the reference's with the bad entries -1
    (forward, weight and bias gradients), and bitwise the kernels' own on that cleaned table (all gradients)."""
    monkeypatch.delenv(checks.CHECK_VAR, raising=False)
    torch.manual_seed(1)
    feats = torch.randn(7, c, dtype=dtype)
    weight, bias = torch.randn(9, c, dtype=dtype), torch.randn(c, dtype=dtype)
    nbr, clean = _bad_table(bad)
    out, grads = _grads(lambda f, w, b: sparse_depthwise_conv(f, nbr, w, b, symmetric=True, validate=False),
                        feats, weight, bias)
    ref, ref_grads = _grads(lambda f, w, b: sparse_depthwise_conv_reference(f, clean, w, b), feats, weight, bias)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, **tol)
    for g, r in zip(grads[1:], ref_grads[1:]):  # the input gradient of a symmetric table: below
        torch.testing.assert_close(g, r, **tol)
    same, same_grads = _grads(lambda f, w, b: sparse_depthwise_conv(f, clean, w, b, symmetric=True, validate=False),
                              feats, weight, bias)
    assert torch.equal(out, same) and all(torch.equal(g, s) for g, s in zip(grads, same_grads))
    # a general table: the transpose drops the bad entries too, so the input gradient is the reference's
    _, grads_t = _grads(lambda f, w, b: sparse_depthwise_conv(f, nbr, w, b, validate=False), feats, weight, bias)
    for g, r in zip(grads_t, ref_grads):
        torch.testing.assert_close(g, r, **tol)


def test_dwconv_extension_reads_nothing_for_bad_entries():
    """The kernels themselves (no Python check on this path): a bad entry is -1, forward and backward."""
    feats, _, weight, bias = _dw_ext_args()
    nbr, clean = _bad_table(2**30)
    ext = backend.extension()
    assert torch.equal(ext.dwconv_forward(feats, nbr, weight, bias), ext.dwconv_forward(feats, clean, weight, bias))
    go = torch.randn_like(feats)
    for got, want in zip(ext.dwconv_backward(go, feats, nbr, nbr, weight, True, True, True),
                         ext.dwconv_backward(go, feats, clean, clean, weight, True, True, True)):
        assert torch.equal(got, want)


def test_check_indices_env_var_forces_the_check(monkeypatch):
    """SPARSE_FCMAE_CHECK_INDICES=1: validate=False calls check too, and so do the custom ops that
    torch.compile runs (their bodies run eagerly); unset, neither checks."""
    feats, _, weight, bias = _dw_ext_args()
    nbr, _ = _bad_table(7)
    x, batch, perm, offsets, gamma, beta = _grn_ext_args()
    bad_perm = perm.clone()
    bad_perm[0] = x.shape[0]
    monkeypatch.delenv(checks.CHECK_VAR, raising=False)
    sparse_depthwise_conv(feats, nbr, weight, bias, symmetric=True, validate=False)
    torch.ops.sparse_fcmae.dwconv(feats, nbr, None, weight, bias)
    sparse_grn(x, batch, 3, gamma, beta, segments=(bad_perm, offsets), validate=False)
    torch.ops.sparse_fcmae.grn(x, batch, bad_perm, offsets, gamma, beta, 1e-6)
    monkeypatch.setenv(checks.CHECK_VAR, "1")
    with pytest.raises(ValueError, match="neighbour table has entries outside"):
        sparse_depthwise_conv(feats, nbr, weight, bias, symmetric=True, validate=False)
    with pytest.raises(ValueError, match="sparse_fcmae::dwconv: the neighbour table has entries outside"):
        torch.ops.sparse_fcmae.dwconv(feats, nbr, None, weight, bias)
    with pytest.raises(ValueError, match="sparse_grn: perm has entries outside"):
        sparse_grn(x, batch, 3, gamma, beta, segments=(bad_perm, offsets), validate=False)
    with pytest.raises(ValueError, match="sparse_fcmae::grn: perm has entries outside"):
        torch.ops.sparse_fcmae.grn(x, batch, bad_perm, offsets, gamma, beta, 1e-6)


def test_nothing_is_checked_while_torch_compile_traces(monkeypatch):
    """A check is a host sync: a graph break under torch.compile. While tracing, the public op skips it (even with
    the debug variable); the custom op it then calls is what the compiled graph runs."""
    monkeypatch.setenv(checks.CHECK_VAR, "1")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not checks.wanted(True)
    monkeypatch.delenv(checks.CHECK_VAR)
    feats, _, weight, bias = _dw_ext_args()
    nbr, clean = _bad_table(7)
    out = sparse_depthwise_conv(feats, nbr, weight, bias, symmetric=True)  # the custom op, unchecked: no error
    assert torch.equal(out, backend.extension().dwconv_forward(feats, clean, weight, bias))


def _grn_bad_cases(x, batch, perm, offsets):
    n = x.shape[0]
    with_batch = batch.clone()
    with_batch[2] = 3  # B = 3
    neg_batch = batch.clone()
    neg_batch[4] = -1
    with_perm = perm.clone()
    with_perm[1] = n
    far_perm = perm.clone()
    far_perm[-1] = 2**40
    short = offsets.clone()
    short[-1] = n - 1
    long_ = offsets.clone()
    long_[-1] = n + 100_000
    start = offsets.clone()
    start[0] = -5
    down = offsets.clone()
    down[1] = offsets[2] + 1  # 6 > 5: decreasing, the ends right
    return {
        "batch past B": ((with_batch, perm, offsets), r"batch has entries outside \[0, B\) with B = 3 samples"),
        "batch negative": ((neg_batch, perm, offsets), "batch has entries outside"),
        "perm past N": ((batch, with_perm, offsets), r"perm has entries outside \[0, N\) with N = 9 rows"),
        "perm far": ((batch, far_perm, offsets), "perm has entries outside"),
        "offsets short": ((batch, perm, short), "offsets must start at 0 and end at N = 9, got 0 .. 8"),
        "offsets long": ((batch, perm, long_), "offsets must start at 0 and end at N = 9, got 0 .. 100009"),
        "offsets start": ((batch, perm, start), "offsets must start at 0"),
        "offsets decreasing": ((batch, perm, down), "offsets must be non-decreasing"),
    }


@pytest.mark.parametrize("case", list(_grn_bad_cases(*_grn_ext_args()[:4])))
def test_grn_bad_segments_through_the_public_op_are_one_clear_error(case, monkeypatch):
    monkeypatch.delenv(checks.CHECK_VAR, raising=False)
    x, batch, perm, offsets, gamma, beta = _grn_ext_args()
    (b, p, o), msg = _grn_bad_cases(x, batch, perm, offsets)[case]
    with pytest.raises(ValueError, match=f"^sparse_grn: {msg}"):
        sparse_grn(x, b, 3, gamma, beta, segments=(p, o))


def test_grn_bad_batch_without_segments_is_one_clear_error():
    x, batch, _, _, gamma, beta = _grn_ext_args()
    batch = batch.clone()
    batch[0] = 5
    with pytest.raises(ValueError, match=r"^sparse_grn: batch has entries outside \[0, B\) with B = 3 samples$"):
        sparse_grn(x, batch, 3, gamma, beta)
    with pytest.raises(ValueError, match=r"offsets must have num_samples \+ 1 = 3 entries, got 4"):
        sparse_grn(x, batch, 2, gamma, beta, segments=batch_segments(batch.clamp(max=2), 3))


@pytest.mark.parametrize("case", list(_grn_bad_cases(*_grn_ext_args()[:4])))
def test_grn_bad_segments_unchecked_read_nothing(case, monkeypatch):
    """validate=False: no crash, and the damage stays where the CUDA kernels put it: a row whose sample index is
    bad is NaN, every row of a sample with a bad perm entry is NaN, offsets are clamped into [0, N] and made
    non-decreasing; every other row is the reference's (the good segments) and finite, forward and backward."""
    monkeypatch.delenv(checks.CHECK_VAR, raising=False)
    x, batch, perm, offsets, gamma, beta = _grn_ext_args()
    (b, p, o), _ = _grn_bad_cases(x, batch, perm, offsets)[case]
    out, grads = _grads(lambda a, g, bb: sparse_grn(a, b, 3, g, bb, segments=(p, o), validate=False), x, gamma, beta)
    if case in ("offsets long", "offsets start"):  # clamped into [0, N]: the good offsets, bitwise
        want, want_grads = _grads(lambda a, g, bb: sparse_grn(a, b, 3, g, bb, segments=(p, offsets)), x, gamma, beta)
        assert torch.equal(out, want) and all(torch.equal(g, w) for g, w in zip(grads, want_grads))
        return
    if case.startswith("offsets"):  # in range but wrong: rows summed into the wrong sample, nothing worse
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
        return
    ref, ref_grads = _grads(lambda a, g, bb: sparse_grn_reference(a, batch, 3, g, bb), x, gamma, beta)
    if case.startswith("batch"):
        nan_rows = (b != batch)
    else:  # the sample holding the bad perm entry
        bad_r = int((p != perm).nonzero()[0])
        sample = int(torch.searchsorted(offsets, torch.tensor(bad_r), right=True)) - 1
        nan_rows = batch == sample
    assert nan_rows.any() and not nan_rows.all()
    assert out[nan_rows].isnan().all() and grads[0][nan_rows].isnan().all()
    torch.testing.assert_close(out[~nan_rows], ref[~nan_rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0][~nan_rows], ref_grads[0][~nan_rows], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_dwconv_cuda_bad_table_entries_read_nothing(cuda_device):
    """On the GPU a table is not validated (that would need a sync): an out-of-range entry counts as absent."""
    feats, nbr, weight, bias = (t.to(cuda_device) for t in _dw_ext_args())
    bad = nbr.clone()
    bad[bad == -1] = 2**30  # far outside [0, N): must contribute nothing, like -1
    ext = backend.extension()
    torch.testing.assert_close(ext.dwconv_forward(feats, bad, weight, bias), ext.dwconv_forward(feats, nbr, weight, bias))


def test_neighbor_table_needs_an_odd_kernel():
    coords = torch.tensor([[0, 0, 0], [0, 0, 1]], dtype=torch.int32)
    x = ME.SparseTensor(torch.randn(2, 3), coordinates=coords)
    with pytest.raises(ValueError, match="odd"):
        neighbor_table(x, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["batch", "perm", "offsets", "gamma", "beta"])
def test_grn_cuda_features_with_a_cpu_tensor_are_rejected(name, cuda_device):
    x, batch, perm, offsets, gamma, beta = _grn_ext_args()
    t = {k: v.to(cuda_device) for k, v in dict(x=x, batch=batch, perm=perm, offsets=offsets, gamma=gamma, beta=beta).items()}
    t[name] = t[name].cpu()
    with pytest.raises(RuntimeError, match=f"but {name} is on cpu"):
        backend.extension().grn_forward(t["x"], t["batch"], t["perm"], t["offsets"], t["gamma"], t["beta"], 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2), (torch.float16, 1.5e-3)])  # as test_kernels_on_device
def test_grn_cuda_matches_reference_empty_sample_zero_channel(dtype, tol, cuda_device):
    x, batch, b, gamma, beta = _grn_case([300, 0, 45, 1], 270)  # C > the finalize block's 256 threads
    x[:, 3] = 0.0
    xd = x.to(cuda_device, dtype)
    bd, gd, btd = (t.to(cuda_device) for t in (batch, gamma, beta))
    out, grads = _grads(lambda a, g, bb: sparse_grn(a, bd, b, g, bb), xd, gd, btd)
    # the reference in float64 on the same rounded inputs
    ref, ref_grads = _grads(lambda a, g, bb: sparse_grn_reference(a, batch, b, g, bb), xd.double().cpu(),
                            gamma.double(), beta.double())
    assert rel_err(out.cpu(), ref) < tol
    for g, r, k in zip(grads, ref_grads, (1, 4, 1)):
        assert torch.isfinite(g).all()
        assert rel_err(g.cpu(), r) < tol * k
