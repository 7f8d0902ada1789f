"""The kernels' argument checks: every tensor on the features' device, sizes, table ranges (one clear error each)."""

import MinkowskiEngine as ME
import pytest
import torch
from _util import rel_err
from test_kernels import _compiled_path_only, _grads, _grn_case  # noqa: F401  (_compiled_path_only: autouse)

from sparse_fcmae.ops import (
    backend,
    batch_segments,
    sparse_grn,
    sparse_grn_reference,
)
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


def test_dwconv_table_entry_out_of_range_is_rejected_on_cpu():
    feats, nbr, weight, bias = _dw_ext_args()
    nbr[3, 2] = feats.shape[0]  # one past the last row
    with pytest.raises(RuntimeError, match=r"outside \[-1, N\)"):
        backend.extension().dwconv_forward(feats, nbr, weight, bias)


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
