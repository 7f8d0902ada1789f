"""The neighbour and child tables (read off a dense index map) against MinkowskiEngine's kernel maps."""
import MinkowskiEngine as ME
import pytest
import torch
from _util import me_children, me_table

from sparse_fcmae.masking import random_patch_mask, upsample_mask
from sparse_fcmae.ops import transpose_neighbors
from sparse_fcmae.sparse import child_table, neighbor_table, sample_segments, to_sparse


def _stages(grid, scale, ratio, batch=3, seed=0):
    """The sparse tensors of all four stages of one masked batch (features are irrelevant here)."""
    gen = torch.Generator().manual_seed(seed)
    mask = random_patch_mask(batch, grid, ratio, generator=gen)
    mask[-1] = 1  # a fully masked last sample
    mask.view(batch, *grid)[:, -1, :] = 1  # the last patch row masked everywhere
    mask_map = upsample_mask(mask, grid, scale)
    x = to_sparse(torch.randn(batch, 2, grid[0] * scale, grid[1] * scale), mask_map)
    stages = [x]
    for _ in range(3):
        out_key, children = child_table(stages[-1], 2)
        stages.append(ME.SparseTensor(torch.zeros(children.shape[0], 2), coordinate_map_key=out_key,
                                      coordinate_manager=x.coordinate_manager))
    return stages


@pytest.mark.parametrize("grid,scale,ratio", [((4, 4), 8, 0.6), ((3, 5), 8, 0.5), ((2, 3), 8, 0.0)])
def test_tables_equal_me_kernel_maps_at_every_stage(grid, scale, ratio):
    stages = _stages(grid, scale, ratio)
    checked = 0
    for i, s in enumerate(stages):
        for k in (3, 5, 7):
            table = neighbor_table(s, k)
            expected = me_table(s, k)
            assert torch.equal(table, expected), (i, k)
            assert torch.equal(transpose_neighbors(expected), expected.flip(1)), (i, k)  # symmetric: see neighbor_table
            checked += int((table >= 0).sum())
        if i < 3:
            out_key, children = child_table(s, 2)
            expected = me_children(s, out_key, 2)
            assert torch.equal(children, expected), i
            assert (children >= 0).any(dim=1).all()  # every output site has a child
    assert checked > 0


def test_tables_without_a_recorded_grid_match_too():
    """A SparseTensor built directly (not by to_sparse): the extent comes from its coordinates."""
    coords = torch.tensor([[0, 0, 0], [0, 1, 2], [0, 3, 3], [1, 2, 1], [1, 5, 0]], dtype=torch.int32)
    x = ME.SparseTensor(torch.randn(5, 2), coordinates=coords)
    for k in (3, 5):
        assert torch.equal(neighbor_table(x, k), me_table(x, k))
    out_key, children = child_table(x, 2)
    assert torch.equal(children, me_children(x, out_key, 2))
    batch, num_samples, _ = sample_segments(x)
    assert num_samples == 2 and torch.equal(batch, x.C[:, 0].long())


def test_sample_segments_count_a_fully_masked_last_sample():
    x = _stages((2, 2), 4, 0.5, batch=3)[0]
    _, num_samples, (perm, offsets) = sample_segments(x)
    assert num_samples == 3
    assert offsets[-1] == offsets[-2]  # the last sample has no rows


def test_tables_are_built_once_per_stage_and_step(monkeypatch):
    from sparse_fcmae.models import SparseConvNeXtV2
    from sparse_fcmae.sparse import neighbors

    builds = []
    real = neighbors._build_index_map

    def counting(x, pad):
        entry = real(x, pad)
        builds.append(tuple(entry[1].shape))
        return entry

    monkeypatch.setattr(neighbors, "_build_index_map", counting)
    enc = SparseConvNeXtV2("atto")
    x = torch.randn(2, 3, 64, 64)
    for _ in range(2):
        enc(x, random_patch_mask(2, (2, 2), 0.5))
    # per step: one index map per stage (padded by 3 for the 7x7 kernel), shared by the stage's
    # neighbour table and its downsampling's child table
    assert builds == 2 * [(2, 16 + 6, 16 + 6), (2, 8 + 6, 8 + 6), (2, 4 + 6, 4 + 6), (2, 2 + 6, 2 + 6)]


@pytest.mark.parametrize("dims", [2, 3])
def test_every_stage_keeps_its_rows_in_sample_then_raster_order(dims):
    """The kernels gather neighbour rows: in hash order (ME's own strided maps) a stage-2 neighbour was a
    median 680 rows away; sorted rows keep it near. Each stage's rows must be sorted by (sample, axes...) and
    hold exactly the occupied strided cells."""
    grid, scale = ((7, 7), 8) if dims == 2 else ((2, 3, 2), 8)
    batch = 4
    mask = random_patch_mask(batch, grid, 0.5, generator=torch.Generator().manual_seed(dims))
    mask[2] = 1  # a sample without rows in the middle of the batch
    x = to_sparse(torch.randn(batch, 2, *(g * scale for g in grid)), upsample_mask(mask, grid, scale))
    s = x
    for _ in range(3):
        out_key, children = child_table(s, 2)
        coords = x.coordinate_manager.get_coordinates(out_key).long()
        c, st = s.C.long(), 2 * torch.tensor(s.tensor_stride)
        parents = torch.cat([c[:, :1], torch.div(c[:, 1:], st, rounding_mode="floor") * st], 1)
        expected = torch.unique(parents, dim=0)  # unique rows, sorted lexicographically: (sample, axes...)
        assert torch.equal(coords, expected)
        s = ME.SparseTensor(torch.zeros(children.shape[0], 1), coordinate_map_key=out_key,
                            coordinate_manager=x.coordinate_manager)
