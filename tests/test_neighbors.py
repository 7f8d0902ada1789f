"""The neighbour and child tables (read off a dense index map) against MinkowskiEngine's kernel maps."""
import MinkowskiEngine as ME
import pytest
import torch
from _util import me_children, me_table

from sparse_fcmae.masking import random_patch_mask, upsample_mask
from sparse_fcmae.ops import transpose_neighbors
from sparse_fcmae.sparse import child_table, neighbor_table, sample_segments, to_sparse


def _stages(grid, scale, ratio, batch=3, seed=0, patch=None):
    """The sparse tensors of all four stages of one masked batch (features are irrelevant here); ``patch``
    recorded (the encoder's way) or not (the child tables then sort the strided cells)."""
    gen = torch.Generator().manual_seed(seed)
    mask = random_patch_mask(batch, grid, ratio, generator=gen)
    mask[-1] = 1  # a fully masked last sample
    mask.view(batch, *grid)[:, -1, :] = 1  # the last patch row masked everywhere
    mask_map = upsample_mask(mask, grid, scale)
    x = to_sparse(torch.randn(batch, 2, grid[0] * scale, grid[1] * scale), mask_map, patch=patch)
    stages = [x]
    for _ in range(3):
        out_key, children = child_table(stages[-1], 2)
        stages.append(ME.SparseTensor(torch.zeros(children.shape[0], 2), coordinate_map_key=out_key,
                                      coordinate_manager=x.coordinate_manager))
    return stages


@pytest.mark.parametrize("patch", [None, 8], ids=["sorted-cells", "patch-corners"])
@pytest.mark.parametrize("grid,scale,ratio", [((4, 4), 8, 0.6), ((3, 5), 8, 0.5), ((2, 3), 8, 0.0)])
def test_tables_equal_me_kernel_maps_at_every_stage(grid, scale, ratio, patch):
    stages = _stages(grid, scale, ratio, patch=patch)
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


def test_patch_corners_give_the_sorted_cells_without_a_sort():
    """With the patch recorded, each strided map is read off the patch corners: the same coordinates in the same
    order as the sorted cells, and no sort (aten unique/sort: a host sync and ~25 launches on CUDA) in any
    downsampling; the first cells (stride 4 of an 8-site patch) are checked too."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    mask_map = upsample_mask(random_patch_mask(3, (3, 5), 0.5, generator=torch.Generator().manual_seed(0)), (3, 5), 8)
    corners = [to_sparse(torch.randn(3, 2, 24, 40), mask_map, patch=8)]
    with Ops() as ops:
        for _ in range(3):
            out_key, children = child_table(corners[-1], 2)
            corners.append(ME.SparseTensor(torch.zeros(children.shape[0], 2), coordinate_map_key=out_key,
                                           coordinate_manager=corners[0].coordinate_manager))
    assert "nonzero_static" in ops.names and not {n for n in ops.names if "unique" in n or "sort" in n}, ops.names
    for a, b in zip(_stages((3, 5), 8, 0.5, patch=None)[1:], _stages((3, 5), 8, 0.5, patch=8)[1:]):
        assert torch.equal(a.C, b.C)
    # a patch that does not cover the output cell (patch 2 at stride 4): the sorted path, still ME's map
    x = _stages((2, 2), 4, 0.5, patch=2)[0]
    out_key, children = child_table(ME.SparseTensor(x.F, coordinate_map_key=x.coordinate_map_key,
                                                    coordinate_manager=x.coordinate_manager), 2)
    assert torch.equal(children, me_children(x, out_key, 2))


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
