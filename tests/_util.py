"""Shared test helpers."""
from __future__ import annotations

import pathlib

import pytest
import torch

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` (``||a - b||`` when ``b`` is zero)."""
    a, b = a.detach().double(), b.detach().double()
    d = (a - b).norm()
    n = b.norm()
    return float(d / n) if n > 0 else float(d)


@torch.no_grad()
def randomize_(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter (GRN gamma/beta start at zero) so each one changes the output."""
    for p in model.parameters():
        p.add_(torch.randn_like(p) * scale)
    return model


@pytest.fixture(autouse=True)
def compiled_path_only(monkeypatch):
    """Autouse where a test module imports it: the compiled kernels take any tap count (343 for 7^3), and
    a silent fallback to the pure-torch reference would make sparse-vs-oracle comparisons test the
    reference instead. A test module's own import of the reference (an oracle) is untouched."""
    from sparse_fcmae.ops import backend

    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    import sparse_fcmae.ops.depthwise as dw_mod
    import sparse_fcmae.ops.grn as grn_mod

    def taken(*a, **k):
        raise AssertionError("the pure-torch fallback ran instead of the compiled kernel")

    monkeypatch.setattr(grn_mod, "sparse_grn_reference", taken)
    monkeypatch.setattr(dw_mod, "sparse_depthwise_conv_reference", taken)


def me_table(x, kernel_size: int) -> torch.Tensor:
    """The oracle neighbour table: MinkowskiEngine's own kernel map of ``x`` onto itself, ``(N, k**D)`` int32."""
    key, manager = x.coordinate_map_key, x.coordinate_manager
    maps = manager.kernel_map(key, key, stride=1, kernel_size=kernel_size, dilation=1)
    table = torch.full((x.F.shape[0], kernel_size ** x.D), -1, dtype=torch.int32)
    for k, in_out in maps.items():
        table[in_out[1].long(), k] = in_out[0].int()
    return table


def me_children(x, out_key, stride: int) -> torch.Tensor:
    """The oracle child table: MinkowskiEngine's kernel map of a ``stride**D`` downsampling, ``(N_out, stride**D)``."""
    key, manager = x.coordinate_map_key, x.coordinate_manager
    maps = manager.kernel_map(key, out_key, stride=stride, kernel_size=stride)
    children = torch.full((manager.size(out_key), stride ** x.D), -1, dtype=torch.long)
    for k, in_out in maps.items():
        children[in_out[1].long(), k] = in_out[0].long()
    return children
