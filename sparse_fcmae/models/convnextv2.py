"""ConvNeXt V2 encoders for FCMAE: the sparse one (MinkowskiEngine) and its dense-masked twin
(``dense_masked.py``), for images (``spatial_dims=2``) and volumes (``spatial_dims=3``).

Both have identical parameters (names and shapes of the official FCMAE checkpoint, prefix
``encoder.``), so ``dense.load_state_dict(sparse.state_dict())`` works. At visible sites they agree
exactly; the dense-masked one is the test oracle and the benchmark baseline.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..masking import upsample_mask

try:
    import MinkowskiEngine as ME

    from ..sparse import (
        SparseDepthwiseConv,
        SparseDownsample,
        SparseDropPath,
        SparseGRN,
        SparseLayerNorm,
        densify,
        neighbor_table,
        sample_segments,
        to_sparse,
        with_features,
    )
    from ..sparse.sites import (
        check_visible_count,
        child_rows,
        corner_rows,
        downsampled,
        index_map,
        neighbor_rows,
        sorted_segments,
        visible_sites,
    )
except ImportError as _me_error:  # the dense-masked encoder still runs (e.g. benchmarks on a bare GPU machine)
    ME = None
    ME_IMPORT_ERROR: ImportError | None = _me_error
else:
    ME_IMPORT_ERROR = None
from .base import PATCH_SIZE, STEM_STRIDE, EncoderBase, drop_rates, stem
from .dense_masked import DenseMaskedBlock, DenseMaskedConvNeXtV2  # noqa: F401  (re-exported)


# --------------------------------------------------------------------------------------------
# Sparse encoder
# --------------------------------------------------------------------------------------------
class SparseBlock(nn.Module):
    """dwconv k^D -> LN -> Linear(d, 4d) -> GELU -> GRN -> Linear(4d, d) -> drop path -> + x."""

    def __init__(self, dim: int, drop_path: float = 0.0, kernel_size: int = 7, spatial_dims: int = 2):
        super().__init__()
        self.dwconv = SparseDepthwiseConv(dim, kernel_size, spatial_dims=spatial_dims)
        self.norm = SparseLayerNorm(dim, eps=1e-6)
        self.pwconv1 = ME.MinkowskiLinear(dim, 4 * dim)
        self.act = ME.MinkowskiGELU()
        self.grn = SparseGRN(4 * dim)
        self.pwconv2 = ME.MinkowskiLinear(4 * dim, dim)
        self.drop_path = SparseDropPath(drop_path)

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        return with_features(x, self.forward_rows(x.F, StageRows.of(x, self.dwconv.kernel_size)))

    def forward_rows(self, f: torch.Tensor, stage: StageRows) -> torch.Tensor:
        """The block on the features ``(N, C)`` alone, the stage's tables given: plain tensors, so
        ``torch.compile`` traces it (the kernels are custom ops; MinkowskiEngine stays outside)."""
        # validate=False: the stage's cached tables are right by construction (see sparse/neighbors.py)
        y = ops.sparse_depthwise_conv(f, stage.table, self.dwconv.kernel, self.dwconv.bias, symmetric=True,
                                      validate=False)
        y = F.gelu(self.pwconv1.linear(self.norm.ln(y)))
        y = ops.sparse_grn(y, stage.batch, stage.num_samples, self.grn.gamma, self.grn.beta, self.grn.eps,
                           segments=(stage.perm, stage.offsets), validate=False)
        y = self.pwconv2.linear(y)
        p = self.drop_path.drop_prob
        if p > 0.0 and self.training:  # per sample, as SparseDropPath
            keep = torch.empty(stage.num_samples, 1, device=f.device, dtype=y.dtype).bernoulli_(1.0 - p)
            y = y * (keep / (1.0 - p))[stage.batch]
        return f + y


class StageRows(NamedTuple):
    """A stage's row bookkeeping as plain tensors: neighbour tables, sample index and segments."""

    table: torch.Tensor
    batch: torch.Tensor
    perm: torch.Tensor
    offsets: torch.Tensor
    num_samples: int

    @classmethod
    def of(cls, x: ME.SparseTensor, kernel_size: int = 7) -> StageRows:
        table = neighbor_table(x, kernel_size)  # cached per stage: built by the first block only
        batch, num_samples, (perm, offsets) = sample_segments(x)
        return cls(table, batch, perm, offsets, num_samples)


def _run_blocks(blocks: nn.Sequential, f, table, batch, perm, offsets, num_samples: int):
    stage = StageRows(table, batch, perm, offsets, num_samples)
    for blk in blocks:
        f = blk.forward_rows(f, stage)
    return f


class SparseConvNeXtV2(EncoderBase):
    """ConvNeXt V2 encoder that runs on the visible sites only.

    ``forward_features(x (B, Cin, *S), mask (B, prod(S/32)), 1 = masked)`` returns the dense stage-4
    map ``(B, dims[-1], *S/32)``, zero at masked patches; ``S = (H, W)`` for images
    (``spatial_dims=2``), ``(D, H, W)`` for volumes (``spatial_dims=3``: ME coordinates ``[b, z, y, x]``,
    ``k^3`` depthwise kernels, ``2^3`` downsampling). ``kernel_size``: 3, 5 or 7 (ConvNeXt's).
    """

    def __init__(self, size: str | None = "atto", in_chans: int = 3, depths=None, dims=None, drop_path_rate: float = 0.0,
                 kernel_size: int = 7, spatial_dims: int = 2):
        if ME is None:
            raise ImportError(f"the sparse encoder needs MinkowskiEngine: {ME_IMPORT_ERROR}")
        super().__init__(size, in_chans, depths, dims, drop_path_rate, kernel_size, spatial_dims)
        d, sd = self.dims, self.spatial_dims
        self.downsample_layers = nn.ModuleList([stem(in_chans, d[0], sd)])
        for i in range(1, 4):
            self.downsample_layers.append(
                nn.Sequential(
                    SparseLayerNorm(d[i - 1], eps=1e-6),
                    SparseDownsample(d[i - 1], d[i], stride=2, spatial_dims=sd),
                )
            )
        rates = drop_rates(self.depths, drop_path_rate)
        self.stages = nn.ModuleList(
            nn.Sequential(*[SparseBlock(d[i], rates[i][j], kernel_size, sd) for j in range(self.depths[i])])
            for i in range(4)
        )
        self._init_weights()
        self.graph = False

    def use_graph(self, enabled: bool = True) -> SparseConvNeXtV2:
        """Run :meth:`forward_graph` whenever the visible count is known (FCMAE passes it): the same encoder
        with no MinkowskiEngine object and static shapes, so ``torch.compile`` traces it whole (of FCMAE:
        the whole step in one graph, CUDA graphs with ``mode="reduce-overhead"``)."""
        ops.backend.extension()  # loaded before tracing: a guard on "not loaded yet" would force a recompile
        # each visible count (mask ratio), batch size, train/eval and grad/no-grad is its own graph: more than
        # dynamo's default 8 per function in a benchmark sweep, past which it would silently run eagerly
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.graph = enabled
        return self

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                         num_visible: int | None = None) -> torch.Tensor:
        """``num_visible``: visible patches per sample, the same in every sample (at a fixed mask ratio), when
        the caller knows it; with :meth:`use_graph` it selects the graph path."""
        grid = self.check_input(x)
        if mask is None:
            mask, num_visible = self.default_mask(x), math.prod(grid)
        if self.graph and num_visible is not None:
            if mask.device.type == "cpu" and not torch.compiler.is_compiling():
                check_visible_count(mask, num_visible)
            elif mask.shape[0]:  # no host sync: a failure stops the device (the message on stderr)
                torch._assert_async(((mask < 0.5).sum(1) == num_visible).all(),
                                    f"the graph path needs {num_visible} visible patches in every sample")
            return self.forward_graph(x, mask, num_visible)
        x = self.downsample_layers[0](x)
        s = to_sparse(x, upsample_mask(mask, grid, PATCH_SIZE // STEM_STRIDE), patch=PATCH_SIZE // STEM_STRIDE)
        for i in range(4):
            if i > 0:
                s = self.downsample_layers[i](s)
            # the blocks run on the features alone (no SparseTensor per layer: ~40% fewer Python calls per
            # forward, i.e. host time, with the same ops); MinkowskiEngine only between stages
            s = with_features(s, _run_blocks(self.stages[i], s.F, *StageRows.of(s, self.kernel_size)))
        return densify(s, x.shape[0], *grid)

    def forward_graph(self, x: torch.Tensor, mask: torch.Tensor, num_visible: int) -> torch.Tensor:
        """:meth:`forward_features` on plain tensors: the same tables (``sparse.sites``, shared with the
        MinkowskiEngine path) and layers, every shape fixed by ``num_visible`` and no host synchronisation,
        so one ``torch.compile`` graph holds it. ``mask`` must have ``num_visible`` visible patches in every
        sample (:meth:`forward_features` checks it: on the host where the mask is, else by a device assertion)."""
        grid = self.check_input(x)
        batch, scale, k = x.shape[0], PATCH_SIZE // STEM_STRIDE, self.kernel_size
        pad = max(k // 2, 1)  # neighbours k // 2 around a site; children 1 past a corner
        x = self.downsample_layers[0](x)
        sites = visible_sites(mask, grid, scale, num_visible)
        f = x.movedim(1, -1)[(sites.b,) + sites.pos]
        index = index_map(sites, pad)
        for i in range(4):
            if i > 0:
                norm, down = self.downsample_layers[i]
                strided = downsampled(sites, corner_rows(sites, down.stride), down.stride)
                children = child_rows(sites, index, pad, strided.b, strided.pos, down.stride)
                f = down.forward_rows(norm.ln(f), children)
                sites = strided
                index = index_map(sites, pad)
            perm, offsets = sorted_segments(sites.b, batch)
            f = _run_blocks(self.stages[i], f, neighbor_rows(sites, index, pad, k), sites.b, perm, offsets, batch)
        out = f.new_zeros(*sites.grid, f.shape[1])
        out[(sites.b,) + sites.pos] = f
        return out.movedim(-1, 1)

    forward = forward_features
