"""Depthwise (channel-wise) submanifold convolution over a neighbour table."""
from __future__ import annotations

import torch

from . import backend, checks, library  # noqa: F401  (library registers torch.ops.sparse_fcmae.*)


def sparse_depthwise_conv_reference(
    feats: torch.Tensor, neighbors: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``out[i, c] = bias[c] + sum_k feats[neighbors[i, k], c] * kernel[k, c]``.

    ``feats (N, C)``; ``neighbors (N, K)`` int64 or int32, ``-1`` where the neighbour at kernel offset
    ``k`` is absent (outside the visible set); ``kernel (K, C)`` in MinkowskiEngine's offset order.
    """
    n, c = feats.shape
    padded = torch.cat([feats, feats.new_zeros(1, c)])  # row n is the "absent" neighbour
    idx = torch.where(neighbors < 0, torch.full_like(neighbors, n), neighbors)
    out = feats.new_zeros(n, c) if bias is None else bias.reshape(1, c).expand(n, c).clone()
    for k in range(neighbors.shape[1]):
        out = out + padded.index_select(0, idx[:, k]) * kernel[k]
    return out


def transpose_neighbors(neighbors: torch.Tensor) -> torch.Tensor:
    """``(N, K)`` int32 table ``t`` with ``t[j, k] = i`` where ``neighbors[i, k] = j`` (else -1).

    Needs each column to hit a row at most once, which holds for every convolution map (an offset
    moves distinct sites to distinct sites). For a submanifold map with a centred odd kernel this is
    ``neighbors.flip(1)``; computing it generically keeps the op correct for any such table.
    """
    n, k = neighbors.shape
    out = torch.full((n, k), -1, dtype=torch.int32, device=neighbors.device)
    valid = (neighbors >= 0) & (neighbors < n)  # an entry outside [0, N) is absent, as in the kernels
    rows = torch.arange(n, dtype=torch.int32, device=neighbors.device).unsqueeze(1).expand(n, k)
    cols = torch.arange(k, device=neighbors.device).unsqueeze(0).expand(n, k)
    out[neighbors[valid].long(), cols[valid]] = rows[valid]
    return out


class SparseDepthwiseConvFunction(torch.autograd.Function):
    """Compiled depthwise conv; the input gradient gathers over the transposed table, or (``neighbors_t`` None:
    a symmetric table) over the same table with the taps reversed; no atomics either way."""

    @staticmethod
    def forward(ctx, feats, kernel, bias, neighbors, neighbors_t):  # type: ignore[override]
        ext = backend.extension()
        out = ext.dwconv_forward(feats, neighbors, kernel.detach(), None if bias is None else bias.detach())
        ctx.save_for_backward(feats, kernel, neighbors, neighbors_t)
        ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        feats, kernel, neighbors, neighbors_t = ctx.saved_tensors
        need_f, need_w, need_b = ctx.needs_input_grad[:3]
        ext = backend.extension()
        gf, gw, gb = ext.dwconv_backward(
            grad_out, feats, neighbors, neighbors_t, kernel.detach(), need_f, need_w, need_b and ctx.bias_meta is not None
        )
        gw = gw.to(kernel.dtype) if need_w else None
        gb = gb.reshape(ctx.bias_meta[0]).to(ctx.bias_meta[1]) if need_b and ctx.bias_meta is not None else None
        return (gf if need_f else None), gw, gb, None, None


def sparse_depthwise_conv(
    feats: torch.Tensor,
    neighbors: torch.Tensor,
    kernel: torch.Tensor,
    bias: torch.Tensor | None,
    neighbors_t: torch.Tensor | None = None,
    *,
    symmetric: bool = False,
    validate: bool = True,
) -> torch.Tensor:
    """Sparse depthwise conv (contract of :func:`sparse_depthwise_conv_reference`), compiled kernels.

    The input gradient needs the map backwards. ``symmetric=True`` says the table is a submanifold map with a
    centred odd kernel (the same sites in and out: every table :func:`~sparse_fcmae.sparse.neighbor_table`
    builds), so offset ``K-1-k`` is offset ``k`` reversed and the backward gathers over the same table with the
    taps reversed: no second table. Otherwise ``neighbors_t``, the transposed table
    (:func:`transpose_neighbors`), is used, or computed when not given.
    Falls back to the reference (one warning) when the extension is unavailable.

    ``validate``: check that every entry of ``neighbors`` (and ``neighbors_t``) is in ``[-1, N)``, one
    ``ValueError`` if not (a pass over the table and one host sync). ``False`` for a table known to be right,
    as the model's cached ones (``sparse.neighbor_table``): the kernels then count an entry outside ``[0, N)``
    as absent, never reading out of bounds. ``SPARSE_FCMAE_CHECK_INDICES=1`` checks every call; nothing is
    checked while ``torch.compile`` traces (see :mod:`sparse_fcmae.ops.checks`).
    """
    if backend.needs_float32(feats):
        return sparse_depthwise_conv(feats.float(), neighbors, kernel, bias, neighbors_t,
                                     symmetric=symmetric, validate=validate).to(feats.dtype)
    if checks.wanted(validate):
        checks.check_table(neighbors, feats.shape[0])
        if neighbors_t is not None and not symmetric:
            checks.check_table(neighbors_t, feats.shape[0], what="transposed table")
    if backend.kernels(feats) is None:
        return sparse_depthwise_conv_reference(feats, neighbors, kernel, bias)
    nbr = neighbors.to(torch.int32)
    if symmetric:
        nbr_t = None
    else:
        nbr_t = neighbors_t.to(torch.int32) if neighbors_t is not None else transpose_neighbors(nbr)
    if torch.compiler.is_compiling():  # the custom op torch.compile traces (eager: the cheaper Function call)
        return torch.ops.sparse_fcmae.dwconv(feats, nbr, nbr_t, kernel, bias)
    return SparseDepthwiseConvFunction.apply(feats, kernel, bias, nbr, nbr_t)
