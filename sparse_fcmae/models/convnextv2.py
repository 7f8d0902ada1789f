"""ConvNeXt V2 encoders for FCMAE: the sparse one (MinkowskiEngine) and its dense-masked twin.

Both have identical parameters (names and shapes of the official FCMAE checkpoint, prefix
``encoder.``), so ``dense.load_state_dict(sparse.state_dict())`` works. At visible sites they agree
exactly; the dense-masked one is the test oracle and the benchmark baseline.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

from .. import ops
from ..kernel_layout import conv_kernel_to_weight, depthwise_kernel_to_weight
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
        neighbor_tables,
        sample_segments,
        to_sparse,
        with_features,
    )
except ImportError as _me_error:  # the dense-masked encoder still runs (e.g. benchmarks on a bare GPU machine)
    ME = None
    ME_IMPORT_ERROR: ImportError | None = _me_error
else:
    ME_IMPORT_ERROR = None
from .layers import LayerNorm2d
from .sizes import get_size

PATCH_SIZE = 32  # the encoder's total stride; one mask patch = one output site
STEM_STRIDE = 4


def _check_input(x: torch.Tensor, in_chans: int) -> tuple[int, int]:
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ValueError(f"expected images (B, {in_chans}, H, W), got {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h % PATCH_SIZE or w % PATCH_SIZE:
        raise ValueError(f"image size {h}x{w} is not divisible by {PATCH_SIZE}")
    return h // PATCH_SIZE, w // PATCH_SIZE


def _stem(in_chans: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_chans, dim, kernel_size=STEM_STRIDE, stride=STEM_STRIDE), LayerNorm2d(dim, eps=1e-6))


def _drop_rates(depths, drop_path_rate: float) -> list[list[float]]:
    rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
    out, i = [], 0
    for d in depths:
        out.append(rates[i : i + d])
        i += d
    return out


class _EncoderBase(nn.Module):
    def __init__(self, size: str | None, in_chans: int, depths, dims, drop_path_rate: float):
        super().__init__()
        if size is not None:
            depths, dims = get_size(size)
        if depths is None or dims is None:
            raise ValueError("give a size name or both depths and dims")
        self.size = size
        self.in_chans = in_chans
        self.depths = tuple(depths)
        self.dims = tuple(dims)
        self.num_features = self.dims[-1]
        self.drop_path_rate = drop_path_rate

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            for name in ("kernel",):
                p = getattr(m, name, None)
                if isinstance(p, nn.Parameter):
                    trunc_normal_(p, std=0.02)
                    if getattr(m, "bias", None) is not None:
                        nn.init.zeros_(m.bias)

    def default_mask(self, x: torch.Tensor) -> torch.Tensor:
        gh, gw = _check_input(x, self.in_chans)
        return x.new_zeros(x.shape[0], gh * gw)


# --------------------------------------------------------------------------------------------
# Sparse encoder
# --------------------------------------------------------------------------------------------
class SparseBlock(nn.Module):
    """dwconv 7x7 -> LN -> Linear(d, 4d) -> GELU -> GRN -> Linear(4d, d) -> drop path -> + x."""

    def __init__(self, dim: int, drop_path: float = 0.0, kernel_size: int = 7):
        super().__init__()
        self.dwconv = SparseDepthwiseConv(dim, kernel_size)
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
        y = ops.sparse_depthwise_conv(f, stage.table, self.dwconv.kernel, self.dwconv.bias, stage.table_t)
        y = F.gelu(self.pwconv1.linear(self.norm.ln(y)))
        y = ops.sparse_grn(y, stage.batch, stage.num_samples, self.grn.gamma, self.grn.beta, self.grn.eps,
                           segments=(stage.perm, stage.offsets))
        y = self.pwconv2.linear(y)
        p = self.drop_path.drop_prob
        if p > 0.0 and self.training:  # per sample, as SparseDropPath
            keep = torch.empty(stage.num_samples, 1, device=f.device, dtype=y.dtype).bernoulli_(1.0 - p)
            y = y * (keep / (1.0 - p))[stage.batch]
        return f + y


class StageRows(NamedTuple):
    """A stage's row bookkeeping as plain tensors: neighbour tables, sample index and segments."""

    table: torch.Tensor
    table_t: torch.Tensor
    batch: torch.Tensor
    perm: torch.Tensor
    offsets: torch.Tensor
    num_samples: int

    @classmethod
    def of(cls, x: ME.SparseTensor, kernel_size: int = 7) -> StageRows:
        table, table_t = neighbor_tables(x, kernel_size)  # cached per stage: built by the first block only
        batch, num_samples, (perm, offsets) = sample_segments(x)
        return cls(table, table_t, batch, perm, offsets, num_samples)


def _run_blocks(blocks: nn.Sequential, f, table, table_t, batch, perm, offsets, num_samples: int):
    stage = StageRows(table, table_t, batch, perm, offsets, num_samples)
    for blk in blocks:
        f = blk.forward_rows(f, stage)
    return f


class SparseConvNeXtV2(_EncoderBase):
    """ConvNeXt V2 encoder that runs on the visible sites only.

    ``forward_features(images (B, Cin, H, W), mask (B, H/32 * W/32), 1 = masked)`` returns the
    dense stage-4 map ``(B, dims[-1], H/32, W/32)``, zero at masked patches.
    """

    def __init__(self, size: str | None = "atto", in_chans: int = 3, depths=None, dims=None, drop_path_rate: float = 0.0):
        if ME is None:
            raise ImportError(f"the sparse encoder needs MinkowskiEngine: {ME_IMPORT_ERROR}")
        super().__init__(size, in_chans, depths, dims, drop_path_rate)
        d = self.dims
        self.downsample_layers = nn.ModuleList([_stem(in_chans, d[0])])
        for i in range(1, 4):
            self.downsample_layers.append(
                nn.Sequential(
                    SparseLayerNorm(d[i - 1], eps=1e-6),
                    SparseDownsample(d[i - 1], d[i], stride=2),
                )
            )
        rates = _drop_rates(self.depths, drop_path_rate)
        self.stages = nn.ModuleList(
            nn.Sequential(*[SparseBlock(d[i], rates[i][j]) for j in range(self.depths[i])]) for i in range(4)
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
        gh, gw = _check_input(x, self.in_chans)
        if mask is None:
            mask = self.default_mask(x)
        x = self.downsample_layers[0](x)
        s = to_sparse(x, upsample_mask(mask, (gh, gw), PATCH_SIZE // STEM_STRIDE))
        for i in range(4):
            if i > 0:
                s = self.downsample_layers[i](s)
            # the blocks run on the features alone (no SparseTensor per layer: ~40% fewer Python calls per
            # forward, i.e. host time, with the same ops); MinkowskiEngine only between stages
            run = functools.partial(_run_blocks, self.stages[i]) if self._compiled_stages is None else self._compiled_stages[i]
            s = with_features(s, run(s.F, *StageRows.of(s, self.stages[i][0].dwconv.kernel_size)))
        return densify(s, x.shape[0], gh, gw)

    forward = forward_features


# --------------------------------------------------------------------------------------------
# Dense-masked encoder (same parameters, dense ops, mask re-applied after every spatial op)
# --------------------------------------------------------------------------------------------
class _DenseLayerNorm(nn.Module):
    """Channels-last LayerNorm with the sparse layer's parameter names (``ln.*``)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.ln = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x)


class _DenseLinear(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.linear = nn.Linear(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class _DenseDepthwise(nn.Module):
    """Depthwise conv storing ME's ``kernel (k*k, C)``; maps are ``(B, H, W, C)`` views whose memory is
    in ``memory_format`` (set by the encoder: cuDNN's depthwise conv is faster in NCHW on some GPUs,
    oneDNN's in channels_last on CPU)."""

    memory_format = torch.channels_last

    def __init__(self, dim: int, kernel_size: int = 7):
        super().__init__()
        self.kernel_size = kernel_size
        self.kernel = nn.Parameter(torch.empty(kernel_size ** 2, dim))
        self.bias = nn.Parameter(torch.zeros(1, dim))
        nn.init.kaiming_uniform_(self.kernel, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = depthwise_kernel_to_weight(self.kernel)
        # a no-op when the stream is already in memory_format (the encoder keeps it so)
        xin = x.permute(0, 3, 1, 2).contiguous(memory_format=self.memory_format)
        y = F.conv2d(xin, w, self.bias.reshape(-1), padding=self.kernel_size // 2, groups=w.shape[0])
        return y.permute(0, 2, 3, 1)


class _DenseDownsampleConv(nn.Module):
    """2x2 stride-2 conv storing ME's ``kernel (4, Cin, Cout)`` and ``bias (1, Cout)``; its output
    memory is in ``memory_format`` (a convolution's output follows its input's layout)."""

    memory_format = torch.channels_last

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.kernel = nn.Parameter(torch.empty(4, cin, cout))
        self.bias = nn.Parameter(torch.zeros(1, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xin = x.permute(0, 3, 1, 2).contiguous(memory_format=self.memory_format)
        y = F.conv2d(xin, conv_kernel_to_weight(self.kernel), self.bias.reshape(-1), stride=2)
        return y.permute(0, 2, 3, 1)


class _MaskedGRN(nn.Module):
    """GRN whose norm is taken over each sample's visible sites only."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, dim))
        self.beta = nn.Parameter(torch.zeros(1, dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        g = torch.linalg.vector_norm(x * m, ord=2, dim=(1, 2), keepdim=True)
        n = g / (g.mean(dim=-1, keepdim=True) + self.eps)
        return x + self.gamma * (x * n) + self.beta


class DenseMaskedBlock(nn.Module):
    def __init__(self, dim: int, drop_path: float = 0.0, kernel_size: int = 7):
        super().__init__()
        self.dwconv = _DenseDepthwise(dim, kernel_size)
        self.norm = _DenseLayerNorm(dim)
        self.pwconv1 = _DenseLinear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = _MaskedGRN(4 * dim)
        self.pwconv2 = _DenseLinear(4 * dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """``x (B, H, W, C)`` zero at masked sites; ``m (B, H, W, 1)``, 1 = visible."""
        y = self.act(self.pwconv1(self.norm(self.dwconv(x))))
        y = self.pwconv2(self.grn(y, m))
        return (x + self.drop_path(y)) * m


class DenseMaskedConvNeXtV2(_EncoderBase):
    """Dense simulation of the sparse encoder (as SparK and the official JAX code do).

    ``memory_format`` (``set_memory_format``): the physical layout of the feature maps between blocks,
    ``torch.channels_last`` (default) or ``torch.contiguous_format`` (NCHW); every convolution runs in it.
    The maps are handled as ``(B, H, W, C)`` views either way (LayerNorm, Linear and GRN act on the last
    axis); a residual sum keeps the stream's layout (its first operand's).
    """

    memory_format = torch.channels_last

    def __init__(self, size: str | None = "atto", in_chans: int = 3, depths=None, dims=None, drop_path_rate: float = 0.0):
        super().__init__(size, in_chans, depths, dims, drop_path_rate)
        d = self.dims
        self.downsample_layers = nn.ModuleList([_stem(in_chans, d[0])])
        for i in range(1, 4):
            self.downsample_layers.append(nn.Sequential(_DenseLayerNorm(d[i - 1]), _DenseDownsampleConv(d[i - 1], d[i])))
        rates = _drop_rates(self.depths, drop_path_rate)
        self.stages = nn.ModuleList(
            nn.ModuleList(DenseMaskedBlock(d[i], rates[i][j]) for j in range(self.depths[i])) for i in range(4)
        )
        self._init_weights()

    def set_memory_format(self, memory_format: torch.memory_format) -> DenseMaskedConvNeXtV2:
        if memory_format not in (torch.channels_last, torch.contiguous_format):
            raise ValueError(f"memory_format must be torch.channels_last or torch.contiguous_format, got {memory_format}")
        self.memory_format = memory_format
        for m in self.modules():
            if isinstance(m, (_DenseDepthwise, _DenseDownsampleConv)):
                m.memory_format = memory_format
        return self

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        gh, gw = _check_input(x, self.in_chans)
        if mask is None:
            mask = self.default_mask(x)
        scale = PATCH_SIZE // STEM_STRIDE
        visible = (1.0 - upsample_mask(mask, (gh, gw), scale)).to(x.dtype).unsqueeze(-1)  # (B, H/4, W/4, 1)
        x = x.contiguous(memory_format=self.memory_format)  # the stem's output follows its input's layout
        x = self.downsample_layers[0](x).permute(0, 2, 3, 1) * visible
        for i in range(4):
            if i > 0:
                visible = visible[:, ::2, ::2]  # visible sites come in whole patches: exact
                x = self.downsample_layers[i](x) * visible
            for blk in self.stages[i]:
                x = blk(x, visible)
        return x.permute(0, 3, 1, 2).contiguous(memory_format=self.memory_format)

    forward = forward_features
