"""The compiled kernels as ``torch.library`` custom ops (``torch.ops.sparse_fcmae.*``).

``torch.compile`` traces them without graph breaks (the fake kernels give output shapes and dtypes),
autograd runs their registered backward, and ``torch.library.opcheck`` tests the registration. Float
results of the backward ops are in the accumulation type (float64 for float64 features, else float32),
as the C++ code returns them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import backend, checks


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- depthwise submanifold convolution -------------------------------------------------------------------
@torch.library.custom_op("sparse_fcmae::dwconv", mutates_args=())
def dwconv(feats: Tensor, nbr: Tensor, nbr_t: Tensor | None, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``out[i] = bias + sum_k feats[nbr[i, k]] * weight[k]``; ``nbr_t`` (the transposed table, or None for a
    symmetric table: the backward then reverses the taps) is for the backward only. Not checked (the kernels
    read nothing out of bounds), except with ``SPARSE_FCMAE_CHECK_INDICES=1`` (see ``checks``)."""
    if checks.forced_in_op(feats):
        checks.check_table(nbr, feats.shape[0], op="sparse_fcmae::dwconv")
        if nbr_t is not None:
            checks.check_table(nbr_t, feats.shape[0], op="sparse_fcmae::dwconv", what="transposed table")
    return backend.extension().dwconv_forward(feats, nbr, weight, bias)


@dwconv.register_fake
def _(feats, nbr, nbr_t, weight, bias):
    return torch.empty_like(feats)


@torch.library.custom_op("sparse_fcmae::dwconv_backward", mutates_args=())
def dwconv_backward(grad_out: Tensor, feats: Tensor, nbr: Tensor, nbr_t: Tensor | None, weight: Tensor,
                    with_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_feats, grad_weight (K, C), grad_bias (C,))``; grad_bias is empty without a bias."""
    gf, gw, gb = backend.extension().dwconv_backward(grad_out, feats, nbr, nbr_t, weight, True, True, with_bias)
    return gf, gw, gb if with_bias else gw.new_empty(0)


@dwconv_backward.register_fake
def _(grad_out, feats, nbr, nbr_t, weight, with_bias):
    acc = _acc(feats.dtype)
    return (torch.empty_like(feats), feats.new_empty(weight.shape, dtype=acc),
            feats.new_empty((feats.shape[1] if with_bias else 0,), dtype=acc))


def _dwconv_setup(ctx, inputs, output):
    feats, nbr, nbr_t, weight, bias = inputs
    ctx.save_for_backward(feats, nbr, nbr_t, weight)
    ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)


def _dwconv_grad(ctx, grad_out):
    feats, nbr, nbr_t, weight = ctx.saved_tensors
    gf, gw, gb = torch.ops.sparse_fcmae.dwconv_backward(grad_out, feats, nbr, nbr_t, weight, ctx.bias_meta is not None)
    gb = None if ctx.bias_meta is None else gb.reshape(ctx.bias_meta[0]).to(ctx.bias_meta[1])
    return gf, None, None, gw.to(weight.dtype), gb


dwconv.register_autograd(_dwconv_grad, setup_context=_dwconv_setup)


# ---- GRN over each sample's rows --------------------------------------------------------------------------
@torch.library.custom_op("sparse_fcmae::grn", mutates_args=())
def grn(x: Tensor, batch: Tensor, perm: Tensor, offsets: Tensor, gamma: Tensor, beta: Tensor,
        eps: float) -> tuple[Tensor, Tensor]:
    """``(y, g)``: GRN per sample over its rows (``perm[offsets[b]:offsets[b+1]]``), and the per-sample
    channel norms ``g (B, C)`` the backward reuses. Not checked, except with ``SPARSE_FCMAE_CHECK_INDICES=1``."""
    if checks.forced_in_op(x):
        checks.check_segments(batch, perm, offsets, x.shape[0], op="sparse_fcmae::grn")
    return backend.extension().grn_forward(x, batch, perm, offsets, gamma, beta, eps)


@grn.register_fake
def _(x, batch, perm, offsets, gamma, beta, eps):
    return torch.empty_like(x), x.new_empty((offsets.shape[0] - 1, x.shape[1]), dtype=_acc(x.dtype))


@torch.library.custom_op("sparse_fcmae::grn_backward", mutates_args=())
def grn_backward(grad_out: Tensor, x: Tensor, batch: Tensor, perm: Tensor, offsets: Tensor, gamma: Tensor,
                 g: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x, grad_gamma (C,), grad_beta (C,))``."""
    return backend.extension().grn_backward(grad_out, x, batch, perm, offsets, gamma, g, eps)


@grn_backward.register_fake
def _(grad_out, x, batch, perm, offsets, gamma, g, eps):
    acc = _acc(x.dtype)
    return torch.empty_like(x), x.new_empty((x.shape[1],), dtype=acc), x.new_empty((x.shape[1],), dtype=acc)


def _grn_setup(ctx, inputs, output):
    x, batch, perm, offsets, gamma, beta, eps = inputs
    ctx.save_for_backward(x, batch, perm, offsets, gamma, output[1])
    ctx.eps = eps
    ctx.meta = (gamma.shape, gamma.dtype, beta.shape, beta.dtype)
    ctx.mark_non_differentiable(output[1])


def _grn_grad(ctx, grad_y, grad_g):
    x, batch, perm, offsets, gamma, g = ctx.saved_tensors
    gx, ggamma, gbeta = torch.ops.sparse_fcmae.grn_backward(grad_y, x, batch, perm, offsets, gamma, g, ctx.eps)
    gshape, gdtype, bshape, bdtype = ctx.meta
    return gx, None, None, None, ggamma.reshape(gshape).to(gdtype), gbeta.reshape(bshape).to(bdtype), None


grn.register_autograd(_grn_grad, setup_context=_grn_setup)
