import pytest
import torch

from sparse_fcmae.masking import num_kept, random_patch_mask, upsample_mask, visible_coordinates


def test_official_kept_count_at_224():
    mask = random_patch_mask(5, (7, 7), 0.6)
    assert mask.shape == (5, 49)
    assert (mask == 0).sum(1).tolist() == [19] * 5  # int(49 * 0.4)


def test_masks_differ_per_sample_and_follow_generator():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = random_patch_mask(8, (4, 4), 0.5, g1), random_patch_mask(8, (4, 4), 0.5, g2)
    assert torch.equal(a, b)
    assert len({tuple(r.tolist()) for r in a}) > 1


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        num_kept(16, ratio)


def test_upsample_and_visible_coordinates():
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])  # 2x2 grid: top-left and bottom-right visible
    up = upsample_mask(mask, (2, 2), 3)
    assert up.shape == (1, 6, 6)
    assert up[0, :3, :3].eq(0).all() and up[0, :3, 3:].eq(1).all() and up[0, 3:, 3:].eq(0).all()
    coords = visible_coordinates(up)
    assert coords.dtype == torch.int32 and coords.shape == (18, 3)
    assert {(int(y) // 3, int(x) // 3) for _, y, x in coords} == {(0, 0), (1, 1)}
