"""Kernel benchmark: sparse depthwise conv and sparse GRN, fwd+bwd, at FCMAE occupancy (mask 0.6).

Compares, per stage shape (B=8, 224 px: atto/tiny stages 1-2):
  depthwise 7x7: ours (sparse_fcmae._C) | dense nn.Conv2d(groups=C) on the full grid in NCHW and
  channels_last (the faster one is the baseline) | MinkowskiChannelwiseConvolution | torch reference;
  GRN on the 4*C-channel features: ours | torch reference; plus (GPU) copy bandwidth for GRN.
Median of repeated runs after warm-up. Writes JSON (with machine info) and prints a markdown table.

  python benchmarks/kernels.py                      # CPU, all shapes
  python benchmarks/kernels.py --device cuda --dtype bfloat16 --out $OUT/kernels_cuda_bf16.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository, before any installed copy

from sparse_fcmae.checkpoint import atomic_write  # noqa: E402
from sparse_fcmae.machine import machine_info as _machine_info  # noqa: E402
from sparse_fcmae.masking import random_patch_mask, upsample_mask  # noqa: E402
from sparse_fcmae.ops import (  # noqa: E402
    batch_segments,
    extension_available,
    sparse_depthwise_conv,
    sparse_depthwise_conv_reference,
    sparse_grn,
    sparse_grn_reference,
)
from sparse_fcmae.ops.backend import extension  # noqa: E402
from sparse_fcmae.ops.kernel_layout import grid_neighbor_table  # noqa: E402,F401  (kernel tables without ME)

# name -> (channels, feature map side, mask upsampling scale = patch size at that stage)
SHAPES = {
    "atto-s1": (40, 56, 8),
    "atto-s2": (80, 28, 4),
    "tiny-s1": (96, 56, 8),
    "tiny-s2": (192, 28, 4),
}


def machine_info(device: str) -> dict:
    return {**_machine_info(), "device": device}


CLOCK = time.perf_counter  # --clock thread: time.thread_time (CPU time of this thread)
THREADS = 0  # --clock thread: 1, set again after MinkowskiEngine builds a coordinate manager (it resets the count)


def _pin_threads() -> None:
    if THREADS:
        torch.set_num_threads(THREADS)


class Timing(float):
    """A median time (ms) that also carries the fastest run in ``best``."""

    best: float


def timeit(fn, warmup: int, repeats: int, device: str) -> Timing:
    """Median time of ``fn()`` in ms (wall, or this thread's CPU time with ``--clock thread``)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = CLOCK()
        fn()
        sync()
        times.append((CLOCK() - t0) * 1e3)
    out = Timing(statistics.median(times))
    out.best = min(times)
    return out


def fwd_bwd(forward, leaves, grad):
    """A closure: forward, backward with a fixed output gradient, gradients cleared."""

    def run():
        for t in leaves:
            t.grad = None
        forward().backward(grad)

    return run


def me_channelwise(feats, mask_map, kernel, table, device):
    """fwd+bwd closure of MinkowskiEngine's channel-wise conv (None without ME), and its max error vs ours."""
    try:
        import MinkowskiEngine as ME
    except ImportError:
        return None, None
    from sparse_fcmae.sparse import neighbor_table, to_sparse

    dense = torch.zeros(mask_map.shape[0], feats.shape[1], *mask_map.shape[1:], device=device)
    s = to_sparse(dense, mask_map)
    assert torch.equal(neighbor_table(s, 7).cpu(), table.cpu()), "grid table differs from ME's"
    conv = ME.MinkowskiChannelwiseConvolution(feats.shape[1], 7, dimension=2).to(device)
    with torch.no_grad():
        conv.kernel.copy_(kernel)
    f = feats.detach().clone().requires_grad_()

    def forward():
        x = ME.SparseTensor(f, coordinate_map_key=s.coordinate_map_key, coordinate_manager=s.coordinate_manager)
        return conv(x).F

    with torch.no_grad():
        ours = sparse_depthwise_conv(feats, table, kernel, None)
        err = float((forward() - ours).abs().max() / ours.abs().max())
    return forward, err, f, conv


def bench_shape(name, batch, dtype, device, warmup, repeats, ratio, skip_slow):
    c, side, scale = SHAPES[name]
    grid = (side // scale, side // scale)
    gen = torch.Generator().manual_seed(0)
    mask = random_patch_mask(batch, grid, ratio, generator=gen)
    mask_map = upsample_mask(mask, grid, scale).to(device)
    table = grid_neighbor_table(mask_map, 7)
    n = table.shape[0]
    row = {"shape": name, "B": batch, "C": c, "H": side, "W": side, "N": n, "occupancy": n / (batch * side * side)}
    kw = dict(device=device, dtype=dtype)
    feats = torch.randn(n, c, **kw).requires_grad_()
    kernel = (torch.randn(49, c, device=device) * 0.1).requires_grad_()
    bias = torch.randn(1, c, device=device).requires_grad_()
    gout = torch.randn(n, c, **kw)

    t = {}
    t["dw_ours"] = timeit(
        fwd_bwd(lambda: sparse_depthwise_conv(feats, table, kernel, bias, symmetric=True, validate=False), [feats, kernel, bias], gout),
        warmup, repeats, device,
    )
    if not skip_slow:
        t["dw_reference"] = timeit(
            fwd_bwd(lambda: sparse_depthwise_conv_reference(feats, table, kernel.to(dtype), bias.to(dtype)),
                    [feats, kernel, bias], gout),
            max(1, warmup // 2), max(3, repeats // 2), device,
        )
    # dense depthwise conv over the whole grid (what dense masking pays), both layouts
    for layout, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
        conv = nn.Conv2d(c, c, 7, padding=3, groups=c).to(device=device, dtype=dtype).to(memory_format=fmt)
        x = torch.randn(batch, c, side, side, **kw).contiguous(memory_format=fmt).requires_grad_()
        gy = torch.randn(batch, c, side, side, **kw).contiguous(memory_format=fmt)
        t[f"dw_dense_{layout}"] = timeit(fwd_bwd(lambda: conv(x), [x, conv.weight, conv.bias], gy), warmup, repeats, device)
        with torch.no_grad():  # forward alone, for the record
            t[f"dw_dense_{layout}_fwd"] = timeit(lambda: conv(x), warmup, repeats, device)
    with torch.no_grad():
        t["dw_ours_fwd"] = timeit(lambda: sparse_depthwise_conv(feats, table, kernel, bias, symmetric=True, validate=False), warmup, repeats, device)
    t["dw_dense_best"] = min(t["dw_dense_nchw"], t["dw_dense_channels_last"])
    ext = extension()
    if device == "cuda" and hasattr(ext, "set_cuda_dw_variant"):
        # the first, scalar CUDA kernels in the same run (issue 16 items 1-2: the vectorised ones are the default)
        old = ext.set_cuda_dw_variant(1)
        try:
            t["dw_ours_v1"] = timeit(
                fwd_bwd(lambda: sparse_depthwise_conv(feats, table, kernel, bias, symmetric=True, validate=False), [feats, kernel, bias], gout),
                warmup, repeats, device,
            )
            with torch.no_grad():
                t["dw_ours_v1_fwd"] = timeit(
                    lambda: sparse_depthwise_conv(feats, table, kernel, bias, symmetric=True, validate=False), warmup, repeats, device
                )
        finally:
            ext.set_cuda_dw_variant(old)
        row["cuda_dw_variant"] = old
        row["dw_v1_over_ours"] = t["dw_ours_v1"] / t["dw_ours"]
        row["dw_fwd_v1_over_ours"] = t["dw_ours_v1_fwd"] / t["dw_ours_fwd"]
    if not skip_slow and dtype == torch.float32:
        res = me_channelwise(feats.detach(), mask_map, kernel.detach(), table, device)
        _pin_threads()
        if res[0] is not None:
            forward, err, f, conv = res
            row["me_vs_ours_max_rel_err"] = err
            t["dw_me_channelwise"] = timeit(fwd_bwd(forward, [f, conv.kernel], gout), 1, max(3, repeats // 2), device)

    # GRN on the MLP's 4*C features
    c4 = 4 * c
    bidx = torch.nonzero(mask_map < 0.5)[:, 0]
    seg = batch_segments(bidx, batch)
    x4 = torch.randn(n, c4, **kw).requires_grad_()
    gamma = torch.randn(1, c4, device=device).requires_grad_()
    beta = torch.randn(1, c4, device=device).requires_grad_()
    g4 = torch.randn(n, c4, **kw)
    t["grn_ours"] = timeit(
        fwd_bwd(lambda: sparse_grn(x4, bidx, batch, gamma, beta, segments=seg, validate=False), [x4, gamma, beta], g4),
        warmup, repeats, device,
    )
    with torch.no_grad():
        t["grn_ours_fwd"] = timeit(lambda: sparse_grn(x4, bidx, batch, gamma, beta, segments=seg, validate=False), warmup, repeats, device)
    t["grn_reference"] = timeit(
        fwd_bwd(lambda: sparse_grn_reference(x4, bidx, batch, gamma.to(dtype), beta.to(dtype)), [x4, gamma, beta], g4),
        warmup, repeats, device,
    )
    if device == "cuda":
        big = torch.empty(64 * 2 ** 20, dtype=torch.float32, device=device)
        copy_ms = timeit(lambda: big.clone(), 3, 10, device)
        row["copy_GBps"] = 2 * big.numel() * 4 / copy_ms / 1e6
        elt = x4.element_size()
        row["grn_fwd_GBps"] = 3 * n * c4 * elt / t["grn_ours_fwd"] / 1e6  # read x twice, write y
        row["grn_fwd_bwd_GBps"] = 8 * n * c4 * elt / t["grn_ours"] / 1e6  # + read go, x twice, read go, write gx
    row["ms"] = {k: round(v, 4) for k, v in t.items()}
    row["ms_min"] = {k: round(v.best, 4) for k, v in t.items() if isinstance(v, Timing)}
    row["dw_ours_over_dense_min"] = t["dw_ours"].best / t["dw_dense_best"].best
    row["grn_speedup_vs_reference_min"] = t["grn_reference"].best / t["grn_ours"].best
    row["dw_ours_over_dense"] = t["dw_ours"] / t["dw_dense_best"]
    row["dw_fwd_ours_over_dense"] = t["dw_ours_fwd"] / min(t["dw_dense_nchw_fwd"], t["dw_dense_channels_last_fwd"])
    row["grn_speedup_vs_reference"] = t["grn_reference"] / t["grn_ours"]
    if "dw_me_channelwise" in t:
        row["me_over_dense"] = t["dw_me_channelwise"] / t["dw_dense_best"]
    return row


def markdown(rows, info) -> str:
    lines = [
        f"fwd+bwd, median ms ({info['clock']} clock); {info['device']} ({info.get('gpu') or info['cpu_model']}, "
        f"{info['torch_threads']} threads), "
        f"torch {info['torch']}, dtype {info['dtype']}",
        "",
        "| shape | C | N (occ.) | ours dw | dense dw (NCHW / CL) | ME channelwise | torch ref dw | ours/dense "
        "(of mins) | fwd only: ours/dense | GRN ours | GRN ref | GRN speedup (of mins) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in rows:
        m = r["ms"]
        lines.append(
            f"| {r['shape']} | {r['C']} | {r['N']} ({r['occupancy']:.0%}) | {fmt(m['dw_ours'])} | "
            f"{fmt(m['dw_dense_nchw'])} / {fmt(m['dw_dense_channels_last'])} | {fmt(m.get('dw_me_channelwise'))} | "
            f"{fmt(m.get('dw_reference'))} | **{r['dw_ours_over_dense']:.2f}x** ({r['dw_ours_over_dense_min']:.2f}x) | "
            f"{r['dw_fwd_ours_over_dense']:.2f}x | "
            f"{fmt(m['grn_ours'])} | {fmt(m['grn_reference'])} | **{r['grn_speedup_vs_reference']:.1f}x** "
            f"({r['grn_speedup_vs_reference_min']:.1f}x) |"
        )
    if rows and "dw_v1_over_ours" in rows[0]:
        lines.append("")
        for r in rows:
            lines.append(
                f"- {r['shape']}: the scalar CUDA dw kernels (variant 1) {fmt(r['ms']['dw_ours_v1'])} ms fwd+bwd = "
                f"{r['dw_v1_over_ours']:.2f}x ours (variant {r['cuda_dw_variant']}), fwd only {r['dw_fwd_v1_over_ours']:.2f}x"
            )
    if rows and "copy_GBps" in rows[0]:
        lines.append("")
        for r in rows:
            lines.append(
                f"- {r['shape']}: GRN fwd {r['grn_fwd_GBps']:.0f} GB/s, fwd+bwd {r['grn_fwd_bwd_GBps']:.0f} GB/s, "
                f"copy {r['copy_GBps']:.0f} GB/s ({r['grn_fwd_bwd_GBps'] / r['copy_GBps']:.0%})"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--mask-ratio", type=float, default=0.6)
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "thread"],
        help="wall: wall time with torch's threads; thread: 1 thread, its CPU time (robust on a shared CPU)",
    )
    p.add_argument("--skip-slow", action="store_true", help="skip the torch reference and ME depthwise convs")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernels_<device>_<dtype>.json)")
    a = p.parse_args(argv)
    shapes = [s for s in a.shapes.split(",") if s]
    bad = [s for s in shapes if s not in SHAPES]
    if bad:
        print(f"error: unknown shape(s) {bad}; choose from {list(SHAPES)}", file=sys.stderr)
        return 2
    if a.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    if a.device == "cpu" and a.dtype != "float32":
        print("error: the CPU kernels run float32/float64 only; use --dtype float32", file=sys.stderr)
        return 2
    if not extension_available():
        print("error: sparse_fcmae._C is not built; run `python setup.py build_ext --inplace`", file=sys.stderr)
        return 2
    if a.clock == "thread":
        if a.device == "cuda":
            print("error: --clock thread is for CPU runs", file=sys.stderr)
            return 2
        global CLOCK, THREADS
        CLOCK, THREADS = time.thread_time, 1
        _pin_threads()
    if a.device == "cuda":  # the dense baseline at its best: cuDNN picks the fastest algorithm per shape
        torch.backends.cudnn.benchmark = True
    dtype = getattr(torch, a.dtype)
    info = machine_info(a.device)
    info["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    info["clock"] = a.clock
    info["dtype"] = a.dtype
    rows = []
    for s in shapes:
        rows.append(bench_shape(s, a.batch, dtype, a.device, a.warmup, a.repeats, a.mask_ratio, a.skip_slow))
        print(f"[kernels] {s}: {json.dumps(rows[-1]['ms'])}", file=sys.stderr, flush=True)
    table = markdown(rows, info)
    suffix = "_1thread_cputime" if a.clock == "thread" else ""
    out = a.out or os.path.join(HERE, "results", f"kernels_{a.device}_{a.dtype}{suffix}.json")
    payload = {"machine": info, "args": vars(a), "results": rows, "markdown": table}
    atomic_write(out, lambda f: f.write(json.dumps(payload, indent=2).encode()))
    print(table)
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
