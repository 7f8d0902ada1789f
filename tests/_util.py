"""Shared test helpers."""
from __future__ import annotations

import pathlib

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
