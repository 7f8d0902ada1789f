"""Volumes (``spatial_dims=3``) against independent oracles: the dense-masked 3D twin, a plain dense 3D
ConvNeXt V2 (mask ratio 0), explicit patch crops (tables and kernels: test_volumes_kernels.py).
Tiny volumes (atto, batch 2, 64^3 or smaller grids) so that everything runs in seconds on a CPU."""
import itertools

import pytest
import torch
from _util import compiled_path_only, randomize_, rel_err  # noqa: F401  (compiled_path_only: autouse)

from sparse_fcmae.masking import random_patch_mask
from sparse_fcmae.models import FCMAE, DenseMaskedConvNeXtV2, SparseConvNeXtV2
from sparse_fcmae.models.convnext3d import ConvNeXtV2_3D

P = 32


def _mask(batch, grid, ratio, seed=0):
    return random_patch_mask(batch, grid, ratio, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------- encoders
def _pair(in_chans, kernel_size=7, device="cpu"):
    sparse = randomize_(SparseConvNeXtV2("atto", in_chans=in_chans, kernel_size=kernel_size, spatial_dims=3))
    dense = DenseMaskedConvNeXtV2("atto", in_chans=in_chans, kernel_size=kernel_size, spatial_dims=3)
    dense.load_state_dict(sparse.state_dict())
    return sparse.to(device), dense.to(device)


def _one_patch_and_a_masked_plane(grid, axis, seed=0):
    """Batch 2: sample 0 sees one patch; sample 1 about half; the last patch plane of ``axis`` is
    masked in both (ME's dense() would come back too small there: official issue #79)."""
    mask = _mask(2, grid, 0.5, seed).view(2, *grid)
    mask[0] = 1
    mask[0, 0, 0, 0] = 0
    plane = [slice(None)] * 4
    plane[1 + axis] = -1
    mask[tuple(plane)] = 1
    mask[1, 0, 0, 0] = 0
    return mask.reshape(2, -1)


@pytest.mark.gpu
@pytest.mark.parametrize("in_chans,kernel_size,axis", [(1, 7, 0), (2, 3, 1), (2, 5, 2)])
def test_sparse_3d_matches_dense_masked_forward_and_every_gradient(in_chans, kernel_size, axis, device):
    sparse, dense = _pair(in_chans, kernel_size, device)
    grid = (2, 2, 3)  # not a cube: a confused axis changes shapes or sites
    x = torch.randn(2, in_chans, *(g * P for g in grid), device=device)
    mask = _one_patch_and_a_masked_plane(grid, axis).to(device)
    out_s, out_d = sparse(x, mask), dense(x, mask)
    assert out_s.shape == out_d.shape == (2, 320, *grid)
    masked = mask.view(2, 1, *grid).bool().expand_as(out_s)
    assert out_s[masked].abs().max() == 0 and out_s[~masked].abs().mean() > 0
    assert rel_err(out_s, out_d) < 1e-5
    w = torch.randn_like(out_s)
    (out_s * w).sum().backward()
    (out_d * w).sum().backward()
    grads_d = dict(dense.named_parameters())
    for name, p in sparse.named_parameters():
        g_s, g_d = p.grad, grads_d[name].grad
        assert g_s is not None and g_d is not None and g_s.shape == g_d.shape, name
        assert g_d.abs().max() > 0, f"{name}: the oracle's gradient is zero, the test would be vacuous"
        assert rel_err(g_s, g_d) < 1e-4, name
    assert sparse.downsample_layers[0][0].weight.shape == (40, in_chans, 4, 4, 4)
    assert sparse.stages[0][0].dwconv.kernel.shape == (kernel_size ** 3, 40)
    assert sparse.downsample_layers[1][1].kernel.shape == (8, 40, 80)


def _timm_style_from_sparse(sd: dict, kernel_size: int) -> dict:
    """Sparse 3D weights -> ConvNeXtV2_3D keys, by explicit loops over ME's offset order (independent of
    kernel_layout.py, which the encoders use)."""
    k = kernel_size
    out = {"stem.0.weight": sd["downsample_layers.0.0.weight"], "stem.0.bias": sd["downsample_layers.0.0.bias"],
           "stem.1.weight": sd["downsample_layers.0.1.weight"], "stem.1.bias": sd["downsample_layers.0.1.bias"]}
    for i in range(1, 4):
        ker = sd[f"downsample_layers.{i}.1.kernel"]  # (8, Cin, Cout)
        w = torch.zeros(ker.shape[2], ker.shape[1], 2, 2, 2)
        for a, b, c in itertools.product(range(2), repeat=3):
            w[:, :, a, b, c] = ker[a + 2 * b + 4 * c].T
        out[f"stages.{i}.downsample.1.weight"] = w
        out[f"stages.{i}.downsample.1.bias"] = sd[f"downsample_layers.{i}.1.bias"].reshape(-1)
        out[f"stages.{i}.downsample.0.weight"] = sd[f"downsample_layers.{i}.0.ln.weight"]
        out[f"stages.{i}.downsample.0.bias"] = sd[f"downsample_layers.{i}.0.ln.bias"]
    blocks = {key.split(".dwconv.kernel")[0] for key in sd if key.endswith(".dwconv.kernel")}
    for blk in blocks:  # "stages.i.j"
        _, i, j = blk.split(".")
        t = f"stages.{i}.blocks.{j}."
        ker = sd[blk + ".dwconv.kernel"]  # (k^3, C)
        w = torch.zeros(ker.shape[1], 1, k, k, k)
        for a, b, c in itertools.product(range(k), repeat=3):
            w[:, 0, a, b, c] = ker[a + k * b + k * k * c]
        out[t + "conv_dw.weight"], out[t + "conv_dw.bias"] = w, sd[blk + ".dwconv.bias"].reshape(-1)
        out[t + "norm.weight"], out[t + "norm.bias"] = sd[blk + ".norm.ln.weight"], sd[blk + ".norm.ln.bias"]
        for fc in (1, 2):
            out[t + f"mlp.fc{fc}.weight"] = sd[blk + f".pwconv{fc}.linear.weight"]
            out[t + f"mlp.fc{fc}.bias"] = sd[blk + f".pwconv{fc}.linear.bias"]
        out[t + "mlp.grn.weight"] = sd[blk + ".grn.gamma"].reshape(-1)
        out[t + "mlp.grn.bias"] = sd[blk + ".grn.beta"].reshape(-1)
    return out


@pytest.mark.parametrize("in_chans,kernel_size", [(1, 7), (2, 3)])
def test_mask_ratio_0_matches_a_plain_dense_3d_convnextv2(in_chans, kernel_size):
    enc = randomize_(SparseConvNeXtV2("atto", in_chans=in_chans, kernel_size=kernel_size, spatial_dims=3)).eval()
    ref = ConvNeXtV2_3D("atto", in_chans=in_chans, kernel_size=kernel_size).eval()
    result = ref.load_state_dict(_timm_style_from_sparse(enc.state_dict(), kernel_size), strict=False)
    assert not result.unexpected_keys and all(k.startswith("head.") for k in result.missing_keys)
    assert ref.stem[0].weight.shape == (40, in_chans, 4, 4, 4)
    assert ref.stages[1].downsample[1].weight.shape == (80, 40, 2, 2, 2)
    assert ref.stages[0].blocks[0].conv_dw.weight.shape == (40, 1, kernel_size, kernel_size, kernel_size)
    assert ref.stages[0].blocks[0].mlp.grn.weight.shape == (160,)
    x = torch.randn(2, in_chans, 64, 32, 64)
    with torch.no_grad():
        out = enc.forward_features(x)  # no mask: every patch visible
        zero_mask = enc.forward_features(x, torch.zeros(2, 4))
        expected = ref.forward_features(x)
    assert out.shape == expected.shape == (2, 320, 2, 1, 2)
    assert rel_err(out, expected) < 1e-5 and torch.equal(out, zero_mask)


def test_grn_is_per_sample_in_3d():
    """Sample 0's output must not depend on sample 1 (the official MinkowskiGRN pools the batch)."""
    enc = randomize_(SparseConvNeXtV2("atto", in_chans=1, spatial_dims=3)).eval()
    grid = (2, 2, 2)
    x = torch.randn(2, 1, 64, 64, 64)
    mask = _mask(2, grid, 0.5)
    with torch.no_grad():
        before = enc(x, mask)[0]
        x2 = x.clone()
        x2[1] = torch.randn(1, 64, 64, 64) * 7 + 3
        mask2 = mask.clone()
        mask2[1] = _mask(1, grid, 0.25, seed=5)[0]
        after = enc(x2, mask2)[0]
    assert rel_err(after, before) < 1e-6


def _patch_slices(j, grid):
    """Voxel slices of patch ``j`` of a row-major ``(d, h, w)`` patch grid, by explicit arithmetic."""
    d, rem = divmod(j, grid[1] * grid[2])
    h, w = divmod(rem, grid[2])
    return (slice(None), slice(None), slice(d * P, (d + 1) * P), slice(h * P, (h + 1) * P), slice(w * P, (w + 1) * P))


def test_masked_patches_cannot_reach_the_3d_encoder():
    """Changing a masked patch's voxels changes nothing; changing a visible one changes its own output
    site (and, through the convolutions, possibly other visible ones; masked sites stay zero). The
    mask is not symmetric in any two axes, so a transposed mask layout is caught."""
    enc = randomize_(SparseConvNeXtV2("atto", in_chans=2, spatial_dims=3)).eval()
    grid = (2, 2, 2)
    visible = [0 * 4 + 1 * 2 + 0, 1 * 4 + 1 * 2 + 1]  # (d, h, w) = (0, 1, 0) and (1, 1, 1)
    mask = torch.ones(1, 8)
    mask[0, visible] = 0
    x = torch.randn(1, 2, 64, 64, 64)
    with torch.no_grad():
        base = enc(x, mask)
        for j in range(8):
            x2 = x.clone()
            x2[_patch_slices(j, grid)] += 5.0
            out = enc(x2, mask)
            changed = (out - base).abs().amax(dim=1).flatten() > 0  # per output site, row-major
            if j in visible:
                assert changed[j] and not changed[[i for i in range(8) if i not in visible]].any(), j
            else:
                assert not changed.any(), j
        assert (base.abs().amax(dim=1).flatten() > 0).tolist() == [i in visible for i in range(8)]


# --------------------------------------------------------------------------------------- FCMAE
def test_3d_patchify_layout_matches_volume_crops():
    model = FCMAE("atto", in_chans=2, decoder_dim=16, spatial_dims=3)
    grid = (1, 2, 3)
    vols = torch.randn(2, 2, 32, 64, 96)
    patches = model.patchify(vols)
    assert patches.shape == (2, 6, 32 ** 3 * 2)
    for j in range(6):
        crop = vols[_patch_slices(j, grid)]
        assert torch.equal(patches[:, j], crop.permute(0, 2, 3, 4, 1).reshape(2, -1)), j  # (p, q, r, c) order
    assert torch.equal(model.unpatchify(patches, grid), vols)


def test_3d_loss_ignores_visible_patches_and_uses_normalised_targets():
    model = FCMAE("atto", in_chans=1, decoder_dim=16, spatial_dims=3)
    vols = torch.randn(2, 1, 64, 32, 32) * 3 + 5
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    target = model.patchify(vols)
    norm = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    pred = norm.transpose(1, 2).reshape(2, 32 ** 3, 2, 1, 1).clone()
    assert model.forward_loss(vols, pred, mask) < 1e-8
    pred[0, :, 1] += 10.0  # sample 0's visible patch: no effect
    assert model.forward_loss(vols, pred, mask) < 1e-8
    pred[1, :, 1] += 1.0  # sample 1's masked patch: error 1 on 1 of the 2 masked patches
    assert abs(model.forward_loss(vols, pred, mask).item() - 0.5) < 1e-5
    assert torch.allclose(model.reconstruct(norm.transpose(1, 2).reshape(2, -1, 2, 1, 1), vols), vols, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("in_chans", [1, 2])
def test_sparse_and_dense_masked_3d_fcmae_agree_on_loss_and_gradients(in_chans, device):
    sparse = randomize_(FCMAE("atto", in_chans=in_chans, decoder_dim=32, spatial_dims=3))
    dense = FCMAE("atto", in_chans=in_chans, decoder_dim=32, encoder="dense_masked", spatial_dims=3)
    dense.load_state_dict(sparse.state_dict())
    assert sparse.mask_token.shape == (1, 32, 1, 1, 1) and sparse.pred.weight.shape == (32 ** 3 * in_chans, 32, 1, 1, 1)
    sparse, dense = sparse.to(device), dense.to(device)
    vols = torch.randn(2, in_chans, 64, 64, 64, device=device)
    mask = _one_patch_and_a_masked_plane((2, 2, 2), axis=in_chans).to(device)
    loss_s, pred_s, _ = sparse(vols, mask)
    loss_d, pred_d, _ = dense(vols, mask)
    assert pred_s.shape == (2, 32 ** 3 * in_chans, 2, 2, 2)
    assert rel_err(pred_s, pred_d) < 1e-5 and rel_err(loss_s, loss_d) < 1e-6
    loss_s.backward()
    loss_d.backward()
    gd = dict(dense.named_parameters())
    for name, p in sparse.named_parameters():
        assert gd[name].grad is not None and gd[name].grad.abs().max() > 0, name
        assert rel_err(p.grad, gd[name].grad) < 1e-4, name
    m = sparse.random_masking(vols).cpu()
    assert m.shape == (2, 8) and (m.sum(1) == 8 - int(8 * 0.4)).all()


# -------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("make,call,needle", [
    (lambda: SparseConvNeXtV2("atto", in_chans=1, spatial_dims=3), lambda m: m(torch.randn(1, 1, 64, 64, 48)),
     "volume size 64x64x48 is not divisible by 32"),
    (lambda: SparseConvNeXtV2("atto", in_chans=1, spatial_dims=3), lambda m: m(torch.randn(1, 1, 64, 64)),
     r"expected volumes \(B, 1, D, H, W\)"),
    (lambda: DenseMaskedConvNeXtV2("atto", spatial_dims=4), None, "spatial_dims must be 2 .* or 3"),
    (lambda: FCMAE("atto", spatial_dims=1), None, "spatial_dims must be 2 .* or 3"),
    (lambda: SparseConvNeXtV2("atto", kernel_size=9), None, "kernel_size must be one of"),
])
def test_bad_input_gives_one_line_errors(make, call, needle):
    with pytest.raises(ValueError, match=needle):
        model = make()
        call(model)


def test_dense_masked_3d_layouts_agree():
    """channels_last (channels_last_3d) and contiguous volumes: same output and gradients (float64)."""
    enc = DenseMaskedConvNeXtV2("atto", in_chans=1, kernel_size=3, spatial_dims=3).double()
    assert enc.memory_format == torch.contiguous_format  # the default for volumes (faster on CPU)
    x = torch.randn(2, 1, 32, 32, 64, dtype=torch.float64)
    mask = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    outs = []
    for fmt in (torch.channels_last, torch.contiguous_format):
        enc.set_memory_format(fmt).zero_grad()
        y = enc(x, mask)
        assert y.is_contiguous(memory_format=torch.channels_last_3d if fmt == torch.channels_last else fmt)
        y.square().sum().backward()
        outs.append([y.detach().clone()] + [p.grad.clone() for p in enc.parameters()])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_images_take_kernel_sizes_3_and_5_too(kernel_size):
    """model.kernel_size is one switch for images and volumes: 2D sparse == dense-masked at k = 3, 5."""
    sparse = randomize_(SparseConvNeXtV2("atto", in_chans=1, kernel_size=kernel_size))
    dense = DenseMaskedConvNeXtV2("atto", in_chans=1, kernel_size=kernel_size)
    dense.load_state_dict(sparse.state_dict())
    assert sparse.stages[0][0].dwconv.kernel.shape == (kernel_size ** 2, 40)
    x = torch.randn(2, 1, 96, 64)
    mask = _mask(2, (3, 2), 0.5)
    out_s, out_d = sparse(x, mask), dense(x, mask)
    assert rel_err(out_s, out_d) < 1e-5
    out_s.square().sum().backward()
    out_d.square().sum().backward()
    gd = dict(dense.named_parameters())
    for name, p in sparse.named_parameters():
        assert rel_err(p.grad, gd[name].grad) < 1e-4, name
