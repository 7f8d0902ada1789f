"""ConvNeXt V2 encoders for FCMAE: the sparse one (MinkowskiEngine) and its dense-masked twin
(``dense_masked.py``), for images (``spatial_dims=2``) and volumes (``spatial_dims=3``).

Both have identical parameters (names and shapes of the official FCMAE checkpoint, prefix
``encoder.``), so ``dense.load_state_dict(sparse.state_dict())`` works. At visible sites they agree
exactly; the dense-masked one is the test oracle and the benchmark baseline.
"""
from __future__ import annotations

import functools
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
        self._compiled_stages = None

    def compile_stages(self, **compile_kwargs) -> SparseConvNeXtV2:
        """Run each stage's blocks as one ``torch.compile``d function of plain tensors (features, tables,
        segments); MinkowskiEngine builds the tables and the downsampling between stages, eagerly. Same
        results as eager (tested); what it saves is host time (fewer, fused launches)."""
        ops.backend.extension()  # loaded before tracing: a guard on "not loaded yet" would force a recompile
        # the four stages share one code object, and each has its own shapes (and train/eval, grad/no-grad
        # variants): more cache entries than dynamo's default 8, past which it would run eagerly
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self._compiled_stages = [
            torch.compile(functools.partial(_run_blocks, stage), **compile_kwargs) for stage in self.stages
        ]
        return self

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        grid = self.check_input(x)
        if mask is None:
            mask = self.default_mask(x)
        x = self.downsample_layers[0](x)
        s = to_sparse(x, upsample_mask(mask, grid, PATCH_SIZE // STEM_STRIDE), patch=PATCH_SIZE // STEM_STRIDE)
        for i in range(4):
            if i > 0:
                s = self.downsample_layers[i](s)
            # the blocks run on the features alone (no SparseTensor per layer: ~40% fewer Python calls per
            # forward, i.e. host time, with the same ops); MinkowskiEngine only between stages
            run = functools.partial(_run_blocks, self.stages[i]) if self._compiled_stages is None else self._compiled_stages[i]
            s = with_features(s, run(s.F, *StageRows.of(s, self.stages[i][0].dwconv.kernel_size)))
        return densify(s, x.shape[0], *grid)

    forward = forward_features
