"""Global response normalisation on sparse features, per sample over its visible sites."""
from __future__ import annotations

import torch

from . import backend, checks, library  # noqa: F401  (library registers torch.ops.sparse_fcmae.*)


def sparse_grn_reference(
    feats: torch.Tensor,
    batch: torch.Tensor,
    num_samples: int,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRN of ``feats (N, C)`` whose row ``i`` belongs to sample ``batch[i]``.

    ``g[b, c] = ||feats[batch == b, c]||_2``, ``n = g / (mean_c g + eps)``,
    ``y = feats + gamma * feats * n[batch] + beta``. A sample with no rows contributes nothing;
    an all-zero channel gives ``n = 0`` and a zero (not NaN) gradient.
    """
    c = feats.shape[1]
    sumsq = feats.new_zeros(num_samples, c).index_add_(0, batch, feats * feats)
    nonzero = sumsq > 0
    # sqrt'(0) is infinite: take the root only where it is finite so the gradient stays 0 there.
    g = torch.where(nonzero, torch.sqrt(torch.where(nonzero, sumsq, torch.ones_like(sumsq))), torch.zeros_like(sumsq))
    n = g / (g.mean(dim=1, keepdim=True) + eps)
    return feats + gamma.reshape(1, c) * (feats * n[batch]) + beta.reshape(1, c)


def batch_segments(batch: torch.Tensor, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm (N,), offsets (B+1,))`` int64: rows ``perm[offsets[b]:offsets[b+1]]`` are sample ``b``'s."""
    batch = batch.long()
    perm = torch.argsort(batch, stable=True)
    # sample b's rows start where b would be inserted in the sorted batch: no host sync (bincount has one)
    bounds = torch.arange(num_samples + 1, dtype=torch.long, device=batch.device)
    offsets = torch.searchsorted(batch[perm], bounds)
    return perm, offsets


class SparseGRNFunction(torch.autograd.Function):
    """Compiled GRN: forward saves the per-sample norms ``g (B, C)``; backward is exact."""

    @staticmethod
    def forward(ctx, feats, gamma, beta, batch, perm, offsets, eps):  # type: ignore[override]
        ext = backend.extension()
        y, g = ext.grn_forward(feats, batch, perm, offsets, gamma.detach(), beta.detach(), float(eps))
        ctx.save_for_backward(feats, gamma, g, batch, perm, offsets)
        ctx.eps = float(eps)
        ctx.beta_meta = (beta.shape, beta.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        feats, gamma, g, batch, perm, offsets = ctx.saved_tensors
        ext = backend.extension()
        gx, ggamma, gbeta = ext.grn_backward(grad_out, feats, batch, perm, offsets, gamma.detach(), g, ctx.eps)
        beta_shape, beta_dtype = ctx.beta_meta
        return (
            gx,
            ggamma.reshape(gamma.shape).to(gamma.dtype),
            gbeta.reshape(beta_shape).to(beta_dtype),
            None,
            None,
            None,
            None,
        )


def sparse_grn(
    feats: torch.Tensor,
    batch: torch.Tensor,
    num_samples: int,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    eps: float = 1e-6,
    segments: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """Sparse GRN (same contract as :func:`sparse_grn_reference`) with the compiled kernels.

    ``segments``: ``batch_segments(batch, num_samples)`` when the caller has it cached.
    Falls back to the reference (one warning) when the extension is unavailable.

    ``validate``: check ``batch`` (in ``[0, num_samples)``) and the segments (offsets from 0 to N, not
    decreasing; ``perm`` in ``[0, N)``), one ``ValueError`` if not (a pass over them and one host sync).
    ``False`` for segments known to be right, as the model's cached ones (``sparse.sample_segments``): the
    kernels then read nothing out of bounds for bad ones (a row with a bad sample index, or every row of a
    sample with a bad ``perm`` entry, comes out NaN). ``SPARSE_FCMAE_CHECK_INDICES=1`` checks every call;
    nothing is checked while ``torch.compile`` traces (see :mod:`sparse_fcmae.ops.checks`).
    """
    if backend.needs_float32(feats):
        return sparse_grn(feats.float(), batch, num_samples, gamma, beta, eps, segments, validate=validate).to(
            feats.dtype)
    if checks.wanted(validate):
        if segments is None:
            segments = batch_segments(batch, num_samples)
        checks.check_segments(batch, *segments, feats.shape[0], num_samples)
    if backend.kernels(feats) is None:
        return sparse_grn_reference(feats, batch, num_samples, gamma, beta, eps)
    perm, offsets = segments if segments is not None else batch_segments(batch, num_samples)
    if torch.compiler.is_compiling():  # the custom op torch.compile traces (eager: the cheaper Function call)
        return torch.ops.sparse_fcmae.grn(feats, batch.long(), perm, offsets, gamma, beta, float(eps))[0]
    return SparseGRNFunction.apply(feats, gamma, beta, batch.long(), perm, offsets, eps)
