"""The sparse encoder against independent oracles: timm (mask 0) and the dense-masked encoder."""
import pytest
import timm
import torch
from _util import randomize_, rel_err

from sparse_fcmae.convert import sparse_to_timm
from sparse_fcmae.masking import random_patch_mask, upsample_mask
from sparse_fcmae.models import DenseMaskedConvNeXtV2, SparseConvNeXtV2


def _pair(size="atto", in_chans=3, device="cpu"):
    sparse = randomize_(SparseConvNeXtV2(size, in_chans=in_chans))
    dense = DenseMaskedConvNeXtV2(size, in_chans=in_chans)
    dense.load_state_dict(sparse.state_dict())
    return sparse.to(device), dense.to(device)


@pytest.mark.gpu
@pytest.mark.parametrize("size,img", [("atto", 96), ("tiny", 64)])
def test_mask_ratio_0_matches_timm(size, img, device):
    enc = randomize_(SparseConvNeXtV2(size)).eval()
    ref = timm.create_model(f"convnextv2_{size}", pretrained=False, num_classes=0).eval()
    result = ref.load_state_dict(sparse_to_timm(enc.state_dict(), size), strict=False)
    assert not result.unexpected_keys
    assert all(k.startswith("head.") for k in result.missing_keys)
    enc, ref = enc.to(device), ref.to(device)
    x = torch.randn(2, 3, img, img, device=device)
    with torch.no_grad():
        out = enc.forward_features(x)
        expected = ref.forward_features(x)
    assert out.shape == expected.shape
    assert rel_err(out, expected) < 1e-5


@pytest.mark.gpu
def test_mask_0_6_forward_and_gradients_match_dense_masked(device):
    sparse, dense = _pair(device=device)
    x = torch.randn(3, 3, 128, 128, device=device)
    mask = random_patch_mask(3, (4, 4), 0.6).to(device)
    out_s, out_d = sparse(x, mask), dense(x, mask)
    assert out_s.shape == out_d.shape == (3, 320, 4, 4)
    masked = upsample_mask(mask, (4, 4), 1).unsqueeze(1).bool().expand_as(out_s)
    assert out_s[masked].abs().max() == 0  # nothing leaks into masked patches
    assert out_s[~masked].abs().min() > 0 or out_s[~masked].abs().mean() > 0
    assert rel_err(out_s, out_d) < 1e-5

    w = torch.randn_like(out_s)
    (out_s * w).sum().backward()
    (out_d * w).sum().backward()
    grads_d = dict(dense.named_parameters())
    checked = 0
    for name, p in sparse.named_parameters():
        g_s, g_d = p.grad, grads_d[name].grad
        assert g_s is not None and g_d is not None, name
        assert g_s.shape == g_d.shape, name
        assert g_d.abs().max() > 0, f"{name}: the oracle's gradient is zero, the test would be vacuous"
        assert rel_err(g_s, g_d) < 1e-4, name
        checked += 1
    assert checked == len(list(dense.parameters()))


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3])
def test_last_row_and_column_masked_everywhere_keeps_full_shape(batch, device):
    """Official issue #79: ME's dense() without a shape shrinks the output."""
    sparse, dense = _pair(device=device)
    grid = (4, 4)
    mask = random_patch_mask(batch, grid, 0.25).reshape(batch, *grid)
    mask[:, -1, :] = 1
    mask[:, :, -1] = 1
    mask[:, 0, 0] = 0  # at least one visible patch per sample
    mask = mask.reshape(batch, -1).to(device)
    x = torch.randn(batch, 3, 128, 128, device=device)
    with torch.no_grad():
        out_s, out_d = sparse(x, mask), dense(x, mask)
    assert out_s.shape == (batch, 320, 4, 4)
    assert rel_err(out_s, out_d) < 1e-5


def test_grn_is_per_sample():
    """Sample 0's output must not depend on sample 1 (the official MinkowskiGRN pools the batch)."""
    sparse = randomize_(SparseConvNeXtV2("atto")).eval()
    x = torch.randn(2, 3, 96, 96)
    mask = random_patch_mask(2, (3, 3), 0.6)
    with torch.no_grad():
        before = sparse(x, mask)[0]
        x2 = x.clone()
        x2[1] = torch.randn(3, 96, 96) * 7 + 3
        mask2 = mask.clone()
        mask2[1] = random_patch_mask(1, (3, 3), 0.3)[0]
        after = sparse(x2, mask2)[0]
    assert rel_err(after, before) < 1e-6


@pytest.mark.gpu
def test_sample_without_visible_patches_gives_no_nan(device):
    sparse, dense = _pair(device=device)
    x = torch.randn(2, 3, 64, 64, device=device)
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]], device=device)  # sample 1 fully masked
    out = sparse(x, mask)
    assert torch.isfinite(out).all() and out[1].abs().max() == 0
    assert rel_err(out, dense(x, mask)) < 1e-5
    out.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in sparse.parameters() if p.grad is not None)


@pytest.mark.gpu
@pytest.mark.parametrize("spatial_dims,size,img", [(2, "atto", 128), (3, "atto", 64)])
def test_the_device_computes_what_the_cpu_computes(spatial_dims, size, img, device, record_property):
    """MinkowskiEngine's CUDA backend and the CUDA kernels against the CPU path: forward and every gradient,
    with a sample that has nothing visible."""
    if device.type == "cpu":
        pytest.skip("compares --device with the CPU: run with --device cuda")
    kw = dict(in_chans=1 if spatial_dims == 3 else 3, spatial_dims=spatial_dims)
    on_dev = randomize_(SparseConvNeXtV2(size, **kw))
    on_cpu = SparseConvNeXtV2(size, **kw)
    on_cpu.load_state_dict(on_dev.state_dict())
    on_dev = on_dev.to(device)
    x = torch.randn(3, kw["in_chans"], *(img,) * spatial_dims)
    mask = random_patch_mask(3, (img // 32,) * spatial_dims, 0.6)
    mask[-1] = 1
    out_d, out_c = on_dev(x.to(device), mask.to(device)), on_cpu(x, mask)
    w = torch.randn_like(out_c)
    (out_d * w.to(device)).sum().backward()
    (out_c * w).sum().backward()
    grads_c = dict(on_cpu.named_parameters())
    worst = max(rel_err(p.grad.cpu(), grads_c[n].grad) for n, p in on_dev.named_parameters())
    record_property("rel_err", {"out": rel_err(out_d.cpu(), out_c), "worst_grad": worst})
    assert torch.isfinite(out_d).all()
    assert rel_err(out_d.cpu(), out_c) < 1e-5
    assert worst < 1e-4


def test_drop_path_drops_whole_samples_and_rescales_the_kept_ones():
    from sparse_fcmae.sparse import SparseDropPath, to_sparse

    torch.manual_seed(1)
    b, c = 16, 6
    mask = random_patch_mask(b, (2, 2), 0.5)
    x = to_sparse(torch.randn(b, c, 8, 8), upsample_mask(mask, (2, 2), 4))
    layer = SparseDropPath(0.5).train()
    out = layer(x).F
    batch = x.C[:, 0].long()
    kept = []
    for i in range(b):
        rows = batch == i
        if torch.equal(out[rows], torch.zeros_like(out[rows])):
            kept.append(False)
        else:
            assert torch.allclose(out[rows], x.F[rows] * 2.0)  # 1 / keep_prob, the whole sample alike
            kept.append(True)
    assert 0 < sum(kept) < b  # some samples dropped, some kept
    assert torch.equal(layer.eval()(x).F, x.F)  # identity at eval


def test_the_encoders_drop_path_drops_whole_samples():
    """The path the encoder runs (SparseBlock.forward_rows): per sample, the residual branch is either
    dropped entirely or kept and scaled by 1/keep_prob."""
    from sparse_fcmae.models.convnextv2 import SparseBlock, StageRows
    from sparse_fcmae.sparse import to_sparse

    torch.manual_seed(1)
    b, c = 16, 8
    mask = random_patch_mask(b, (2, 2), 0.5)
    x = to_sparse(torch.randn(b, c, 16, 16), upsample_mask(mask, (2, 2), 8))
    blk = randomize_(SparseBlock(c, drop_path=0.5))
    stage = StageRows.of(x)
    with torch.no_grad():
        branch = blk.eval().forward_rows(x.F, stage) - x.F
        out = blk.train().forward_rows(x.F, stage) - x.F
    kept = []
    for i in range(b):
        rows = stage.batch == i
        if torch.equal(out[rows], torch.zeros_like(out[rows])):
            kept.append(False)
        else:
            torch.testing.assert_close(out[rows], branch[rows] * 2.0)
            kept.append(True)
    assert 0 < sum(kept) < b
