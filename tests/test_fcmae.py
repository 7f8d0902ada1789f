"""FCMAE: patch layout, masked loss, sparse vs dense-masked model, any number of channels."""
import pytest
import torch
from _util import randomize_, rel_err

from sparse_fcmae.masking import random_patch_mask
from sparse_fcmae.models import FCMAE


@pytest.mark.parametrize("in_chans", [1, 3, 4])
def test_patchify_layout_matches_image_crops(in_chans):
    model = FCMAE("atto", in_chans=in_chans, decoder_dim=32)
    imgs = torch.randn(2, in_chans, 64, 96)
    patches = model.patchify(imgs)
    assert patches.shape == (2, 6, 32 * 32 * in_chans)
    for j in range(6):
        hi, wi = divmod(j, 3)
        crop = imgs[:, :, hi * 32 : (hi + 1) * 32, wi * 32 : (wi + 1) * 32]
        assert torch.equal(patches[:, j], crop.permute(0, 2, 3, 1).reshape(2, -1))  # (p, q, c) order
    assert torch.equal(model.unpatchify(patches, (2, 3)), imgs)


def test_loss_ignores_visible_patches_and_uses_normalised_targets():
    model = FCMAE("atto", in_chans=1, decoder_dim=32)
    imgs = torch.randn(2, 1, 64, 64) * 3 + 5
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    target = model.patchify(imgs)
    norm = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    pred = norm.transpose(1, 2).reshape(2, 1024, 2, 2).clone()
    assert model.forward_loss(imgs, pred, mask) < 1e-8  # perfect on masked patches
    pred2 = pred.clone()
    pred2[0, :, 0, 1] += 10.0  # a visible patch of sample 0: no effect
    assert model.forward_loss(imgs, pred2, mask) < 1e-8
    pred2[0, :, 0, 0] += 1.0  # a masked patch: error 1 on 1 of the 3 masked patches
    assert abs(model.forward_loss(imgs, pred2, mask).item() - 1.0 / 3) < 1e-5


@pytest.mark.gpu
def test_sparse_and_dense_masked_fcmae_agree_on_loss_and_gradients(device):
    sparse = randomize_(FCMAE("atto", in_chans=3, decoder_dim=64, encoder="sparse"))
    dense = FCMAE("atto", in_chans=3, decoder_dim=64, encoder="dense_masked")
    dense.load_state_dict(sparse.state_dict())
    sparse, dense = sparse.to(device), dense.to(device)
    imgs = torch.randn(2, 3, 96, 96, device=device)
    mask = random_patch_mask(2, (3, 3), 0.6).to(device)
    loss_s, pred_s, _ = sparse(imgs, mask)
    loss_d, pred_d, _ = dense(imgs, mask)
    assert rel_err(pred_s, pred_d) < 1e-5
    assert rel_err(loss_s, loss_d) < 1e-5
    loss_s.backward()
    loss_d.backward()
    gd = dict(dense.named_parameters())
    for name, p in sparse.named_parameters():
        assert rel_err(p.grad, gd[name].grad) < 1e-4, name


@pytest.mark.parametrize("img", [64, 128])
def test_sparse_encoder_handles_a_batch_with_no_visible_patch(img):
    # every patch masked (e.g. mask_ratio 0.9 at 64 px keeps int(4 * 0.1) = 0): the decoder sees only
    # mask tokens; the dense-masked twin is the oracle for the loss and every gradient
    sparse = randomize_(FCMAE("atto", in_chans=3, decoder_dim=64, encoder="sparse"))
    dense = FCMAE("atto", in_chans=3, decoder_dim=64, encoder="dense_masked")
    dense.load_state_dict(sparse.state_dict())
    g = img // 32
    imgs = torch.randn(2, 3, img, img)
    mask = torch.ones(2, g * g)
    loss_s, pred_s, _ = sparse(imgs, mask)
    loss_d, pred_d, _ = dense(imgs, mask)
    assert torch.isfinite(loss_s) and rel_err(loss_s, loss_d) < 1e-6
    assert rel_err(pred_s, pred_d) < 1e-5
    loss_s.backward()
    loss_d.backward()
    gd = dict(dense.named_parameters())
    for name, p in sparse.named_parameters():
        ref = gd[name].grad
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        assert ref is not None and rel_err(got, ref) < 1e-4, name
    assert sparse.mask_token.grad.abs().sum() > 0  # the decoder really trained on mask tokens
