"""Correctness of the compiled kernels against the float64 torch references, on CPU or GPU.

Runs without MinkowskiEngine (neighbour tables from the mask, as in ``kernels.py``), so it also runs
on a GPU machine that only has torch. Checks forward and all gradients of both ops for every dtype
the device supports, the depthwise conv against a dense float64 ``conv2d`` at the visible sites
(offset order and kernel layout; ``conv3d`` for the volume cases, 27, 125 and 343 taps), and run-to-run determinism. The GRN cases include a sample with
no rows, an all-zero channel, more channels than the CUDA finalize kernel's 256 threads and (the
largest case, on an H100) several row splits per sample. Writes JSON; exit 1 if a check fails.

  python benchmarks/kernel_check.py --device cuda --out $OUT/kernel_check_cuda.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from kernels import grid_neighbor_table, machine_info  # noqa: E402

from sparse_fcmae.checkpoint import atomic_write  # noqa: E402
from sparse_fcmae.masking import random_patch_mask, upsample_mask  # noqa: E402
from sparse_fcmae.ops import (  # noqa: E402
    batch_segments,
    extension_available,
    sparse_depthwise_conv,
    sparse_depthwise_conv_reference,
    sparse_grn,
    sparse_grn_reference,
    transpose_neighbors,
)
from sparse_fcmae.ops.kernel_layout import depthwise_kernel_to_weight  # noqa: E402

# 4-11x the largest errors seen on an H100 (kernel_check_cuda_h100-2026-11-27.json: fp32 1.8e-7, fp16 3.0e-4,
# bf16 2.4e-3): loose enough for rounding, tight enough that a wrong kernel cannot hide in them
TOL = {torch.float32: 2e-6, torch.float16: 1.5e-3, torch.bfloat16: 1e-2}
# (batch, channels, side, patch scale, kernel size, empty sample[, spatial dims: 2 unless given])
CASES = [(3, 13, 12, 4, 7, 1), (2, 40, 16, 8, 7, None), (4, 67, 12, 4, 3, 0), (1, 8, 4, 4, 5, None), (8, 96, 56, 8, 7, None),
         # volumes: k^3 taps (27, 125, 343), the 343-tap case at an atto stage-1 shape (64^3 volumes, 16^3 sites)
         (2, 13, 8, 4, 3, 1, 3), (2, 40, 12, 4, 5, None, 3), (2, 40, 16, 8, 7, None, 3)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    n = b.norm()
    return float((a - b).norm() / n) if n > 0 else float((a - b).norm())


def grads(fn, inputs, seed=0):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out)
    return [out, *torch.autograd.grad((out * w).sum(), inputs)]


def run(device: str, dtypes) -> list[dict]:
    checks = []

    def check(name, err, tol):
        checks.append({"check": name, "rel_err": err, "tol": tol, "ok": bool(err <= tol)})
        print(f"[kernel_check] {'ok  ' if err <= tol else 'FAIL'} {name}: {err:.2e} (tol {tol:.0e})", flush=True)

    for b, c, side, scale, ks, empty, *nd in CASES:
        nd = nd[0] if nd else 2
        grid = (side // scale,) * nd
        mask = random_patch_mask(b, grid, 0.6, generator=torch.Generator().manual_seed(b + c))
        if empty is not None:
            mask[empty] = 1
        mask_map = upsample_mask(mask, grid, scale)
        vis = mask_map < 0.5
        table = grid_neighbor_table(mask_map, ks)
        n = table.shape[0]
        g = torch.Generator().manual_seed(c)
        feats64 = torch.randn(n, c, generator=g, dtype=torch.float64)
        kernel64 = torch.randn(ks ** nd, c, generator=g, dtype=torch.float64) * 0.2
        bias64 = torch.randn(1, c, generator=g, dtype=torch.float64)
        ref = grads(lambda f, w, bb: sparse_depthwise_conv_reference(f, table, w, bb), [feats64, kernel64, bias64])
        # the reference itself against dense conv2d/3d at the visible sites (table order, kernel layout)
        dense_in = torch.zeros(b, c, *(side,) * nd, dtype=torch.float64)
        coords = torch.nonzero(vis)
        at = (coords[:, 0], slice(None), *coords[:, 1:].unbind(1))
        dense_in[at] = feats64
        conv = F.conv2d if nd == 2 else F.conv3d
        dense = conv(dense_in, depthwise_kernel_to_weight(kernel64, nd), bias64.reshape(-1), padding=ks // 2, groups=c)
        check(f"dw ref vs dense conv{nd}d B{b} C{c} k{ks}", rel(ref[0], dense[at]), 1e-12)
        tab_d, tab_t = table.to(device), transpose_neighbors(table.to(device))
        batch = coords[:, 0]
        x4 = torch.randn(n, 4 * c, generator=g, dtype=torch.float64) * 2
        x4[:, 1] = 0  # an all-zero channel: n = 0 and no gradient through g (no 0/0)
        gamma, beta = torch.randn(1, 4 * c, generator=g, dtype=torch.float64), torch.randn(1, 4 * c, generator=g, dtype=torch.float64)
        gref = grads(lambda a, gm, bt: sparse_grn_reference(a, batch, b, gm, bt), [x4, gamma, beta])
        seg = batch_segments(batch.to(device), b)
        for dt in dtypes:
            tol = TOL[dt]
            ins = [feats64.to(device, dt), kernel64.to(device, torch.float32), bias64.to(device, torch.float32)]
            outs = grads(lambda f, w, bb: sparse_depthwise_conv(f, tab_d, w, bb, tab_t), ins)
            # low-precision inputs: compare with the reference on the same rounded inputs
            ref_dt = ref if dt == torch.float32 else grads(
                lambda f, w, bb: sparse_depthwise_conv_reference(f, table, w, bb),
                [ins[0].double().cpu(), kernel64, bias64],
            )
            for name, o, r in zip(["out", "d_feats", "d_kernel", "d_bias"], outs, ref_dt):
                check(f"dw {name} B{b} C{c} k{ks}{'^3' if nd == 3 else ''} {str(dt)[6:]}", rel(o, r), tol)
            again = grads(lambda f, w, bb: sparse_depthwise_conv(f, tab_d, w, bb, tab_t), ins)
            check(f"dw deterministic B{b} C{c} {str(dt)[6:]}", 0.0 if all(torch.equal(x, y) for x, y in zip(outs, again)) else 1.0, 0.0)

            gins = [x4.to(device, dt), gamma.to(device, torch.float32), beta.to(device, torch.float32)]
            bd = batch.to(device)
            gouts = grads(lambda a, gm, bt: sparse_grn(a, bd, b, gm, bt, segments=seg), gins)
            gref_dt = gref if dt == torch.float32 else grads(
                lambda a, gm, bt: sparse_grn_reference(a, batch, b, gm, bt), [gins[0].double().cpu(), gamma, beta]
            )
            for name, o, r in zip(["out", "d_x", "d_gamma", "d_beta"], gouts, gref_dt):
                check(f"grn {name} B{b} C{4 * c} {str(dt)[6:]}", rel(o, r), tol * (2 if name == "d_gamma" else 1))
            again = grads(lambda a, gm, bt: sparse_grn(a, bd, b, gm, bt, segments=seg), gins)
            check(f"grn deterministic B{b} C{4 * c} {str(dt)[6:]}", 0.0 if all(torch.equal(x, y) for x, y in zip(gouts, again)) else 1.0, 0.0)
    return checks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    if not extension_available():
        print("error: sparse_fcmae._C is not built", file=sys.stderr)
        return 2
    dtypes = [torch.float32] + ([torch.bfloat16, torch.float16] if a.device == "cuda" else [])
    checks = run(a.device, dtypes)
    failed = [c for c in checks if not c["ok"]]
    out = a.out or os.path.join(HERE, "results", f"kernel_check_{a.device}.json")
    payload = {"machine": machine_info(a.device), "checks": checks, "failed": len(failed)}
    atomic_write(out, lambda f: f.write(json.dumps(payload, indent=2).encode()))
    print(f"[kernel_check] {len(checks) - len(failed)}/{len(checks)} ok; written {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
