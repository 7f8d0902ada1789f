"""Index checks of the sparse ops' tables: once, where a caller hands a table in, not in every kernel call.

The kernels (CPU and CUDA) are memory-safe whatever the tables hold: a depthwise entry outside ``[0, N)``
counts as absent (one unsigned compare), and a GRN ``perm`` / ``batch`` entry out of range reads nothing (that
sample's rows, or that row, come out NaN; offsets are clamped). So a check is for one clear error, not for
safety, and it costs a pass over the table and one host sync (issue 16, "validate once"):

- the public ops (:func:`~sparse_fcmae.ops.sparse_depthwise_conv`, :func:`~sparse_fcmae.ops.sparse_grn`)
  check what they are given by default (``validate=True``), on CPU and CUDA;
- the model's tables (``sparse.neighbors``) are correct by construction (read off an index map holding
  ``0..N-1`` or ``-1``; segments from a stable sort of the rows' samples) and cached per stage: its calls pass
  ``validate=False``;
- ``SPARSE_FCMAE_CHECK_INDICES=1`` checks every call anyway (debugging), ``validate=False`` included, and inside
  ``torch.compile``d code too: there the custom ops check in their bodies, which run eagerly (no graph break,
  but a host sync per op; skipped while a CUDA graph is being captured);
- nothing is checked while ``torch.compile`` traces.
"""
from __future__ import annotations

import os

import torch

CHECK_VAR = "SPARSE_FCMAE_CHECK_INDICES"


def forced() -> bool:
    """``SPARSE_FCMAE_CHECK_INDICES=1``: check every call (read per call, so tests and debuggers can flip it)."""
    return os.environ.get(CHECK_VAR, "") == "1"


def wanted(validate: bool) -> bool:
    """Whether a public op checks its tables now: asked to (or forced), and not while ``torch.compile`` traces
    (a host sync there would break the graph)."""
    if torch.compiler.is_compiling():
        return False
    return validate or forced()


def forced_in_op(t: torch.Tensor) -> bool:
    """Whether a custom op's body checks (the debug variable), unless a CUDA graph is being captured (no sync
    possible there)."""
    if not forced():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def check_table(table: torch.Tensor, n: int, op: str = "sparse_depthwise_conv", what: str = "neighbour table") -> None:
    """ValueError unless every entry of ``table`` is in ``[-1, n)`` (``-1``: absent). One pass, one host sync.
    Check the caller's table as given: an int64 entry past 2**31 would wrap when cast to int32."""
    if table.numel() == 0:
        return
    lo, hi = torch.stack(list(torch.aminmax(table))).tolist()
    if lo < -1 or hi >= n:
        raise ValueError(f"{op}: the {what} has entries outside [-1, N) with N = {n} rows "
                         f"(min {lo}, max {hi}); -1 marks an absent neighbour")


def check_segments(batch: torch.Tensor, perm: torch.Tensor, offsets: torch.Tensor, n: int,
                   num_samples: int | None = None, op: str = "sparse_grn") -> None:
    """ValueError unless ``offsets`` runs from 0 to ``n`` without decreasing (``num_samples + 1`` entries if
    given), ``batch`` is in ``[0, B)`` and ``perm`` in ``[0, n)``. One pass each, one host sync."""
    if offsets.dim() != 1 or offsets.numel() == 0:
        raise ValueError(f"{op}: offsets must be (B + 1,), got shape {tuple(offsets.shape)}")
    nb = offsets.numel() - 1
    if num_samples is not None and nb != num_samples:
        raise ValueError(f"{op}: offsets must have num_samples + 1 = {num_samples + 1} entries, got {nb + 1}")
    bad_batch, bad_perm, ends, decreasing = torch.stack([
        ((batch < 0) | (batch >= nb)).any(),
        ((perm < 0) | (perm >= n)).any(),
        (offsets[0] != 0) | (offsets[-1] != n),
        (offsets[1:] < offsets[:-1]).any(),
    ]).tolist()
    # the batch first: with segments from batch_segments a bad sample index shows in the offsets too
    if bad_batch:
        raise ValueError(f"{op}: batch has entries outside [0, B) with B = {nb} samples")
    if bad_perm:
        raise ValueError(f"{op}: perm has entries outside [0, N) with N = {n} rows")
    if ends:
        raise ValueError(f"{op}: offsets must start at 0 and end at N = {n}, got {offsets[0].item()} .. "
                         f"{offsets[-1].item()}")
    if decreasing:
        raise ValueError(f"{op}: offsets must be non-decreasing")
