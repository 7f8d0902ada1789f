"""Global response normalisation on sparse features, per sample over its visible sites."""
from __future__ import annotations

import torch


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


def sparse_grn(feats, batch, num_samples, gamma, beta, eps: float = 1e-6):
    """Sparse GRN; uses the compiled kernel when available (see ``sparse_fcmae.ops.backend``)."""
    return sparse_grn_reference(feats, batch, num_samples, gamma, beta, eps)
