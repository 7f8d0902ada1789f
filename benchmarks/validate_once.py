"""Issue 16 "validate once": the atto training step's depthwise and GRN ops (fwd+bwd, as the model calls them)
with the per-call index checks in the CPU kernels (a tree before the change) and without (this tree).

Each tree runs in its own process (both build a ``sparse_fcmae._C``), rounds alternating A, B, A, B, ...; the
time is the CPU time of one thread (``time.thread_time``, 1 torch thread), so other load on a shared machine
barely enters. Per stage of atto (B=8, 224 px, mask 0.6: stage sides 56/28/14/7, C 40/80/160/320, GRN on 4C):
the median over rounds of each process's median. This tree is also timed with ``validate=True`` (a direct
call's check in Python: the cost a user pays once per call by default).

  python benchmarks/validate_once.py --before /tmp/before --out benchmarks/results/validate_once-cpu-<commit>.json
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STAGES = {"s1": (40, 56), "s2": (80, 28), "s3": (160, 14), "s4": (320, 7)}  # channels, side
DEPTHS = {"s1": 2, "s2": 2, "s3": 6, "s4": 2}  # atto's blocks per stage: the ops run once per block


def worker(repeats: int, batch: int, ratio: float, check: bool) -> dict:
    import torch

    from sparse_fcmae.masking import random_patch_mask, upsample_mask
    from sparse_fcmae.ops import batch_segments, sparse_depthwise_conv, sparse_grn
    from sparse_fcmae.ops.kernel_layout import grid_neighbor_table

    torch.set_num_threads(1)
    has_kw = "validate" in inspect.signature(sparse_depthwise_conv).parameters
    kw = {"validate": check} if has_kw else {}
    out = {"has_validate": has_kw, "ms": {}}
    for name, (c, side) in STAGES.items():
        mask = random_patch_mask(batch, (7, 7), ratio, generator=torch.Generator().manual_seed(0))  # 32 px patches
        mask_map = upsample_mask(mask, (7, 7), side // 7)
        table = grid_neighbor_table(mask_map, 7)
        n = table.shape[0]
        g = torch.Generator().manual_seed(1)
        feats = torch.randn(n, c, generator=g).requires_grad_()
        kernel = (torch.randn(49, c, generator=g) * 0.1).requires_grad_()
        bias = torch.randn(1, c, generator=g).requires_grad_()
        gout = torch.randn(n, c, generator=g)
        bidx = torch.nonzero(mask_map < 0.5)[:, 0]
        seg = batch_segments(bidx, batch)
        x4 = torch.randn(n, 4 * c, generator=g).requires_grad_()
        gamma, beta = (torch.randn(1, 4 * c, generator=g).requires_grad_() for _ in range(2))
        g4 = torch.randn(n, 4 * c, generator=g)

        def dw():
            sparse_depthwise_conv(feats, table, kernel, bias, symmetric=True, **kw).backward(gout)

        def grn():
            sparse_grn(x4, bidx, batch, gamma, beta, segments=seg, **kw).backward(g4)

        for op, fn in (("dw", dw), ("grn", grn)):
            for _ in range(3):
                fn()
            ts = []
            for _ in range(repeats):
                t0 = time.thread_time()
                fn()
                ts.append(time.thread_time() - t0)
            out["ms"][f"{name}_{op}"] = 1e3 * statistics.median(ts)
        out.setdefault("N", {})[name] = n
    return out


def run(tree: str, repeats: int, batch: int, ratio: float, check: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": "1"}
    env.pop("SPARSE_FCMAE_CHECK_INDICES", None)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--repeats", str(repeats), "--batch", str(batch),
           "--mask-ratio", str(ratio)] + (["--check"] if check else [])
    res = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", help="a checkout of the commit before, its extension built (required)")
    p.add_argument("--after", default=ROOT)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--mask-ratio", type=float, default=0.6)
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.repeats, a.batch, a.mask_ratio, a.check)))
        return 0
    if not a.before:
        p.error("--before is required")
    runs = {"before": [], "after": [], "after_validate": []}
    for r in range(a.rounds):
        for key, tree, check in (("before", a.before, False), ("after", a.after, False),
                                 ("after_validate", a.after, True)):
            runs[key].append(run(tree, a.repeats, a.batch, a.mask_ratio, check))
        print(f"[validate_once] round {r + 1}/{a.rounds}", file=sys.stderr, flush=True)
    assert not runs["before"][0]["has_validate"] and runs["after"][0]["has_validate"]
    med = {k: {m: statistics.median(x["ms"][m] for x in v) for m in v[0]["ms"]} for k, v in runs.items()}
    # per training step: each op once per block forward+backward (atto: 2, 2, 6, 2 blocks)
    step = {k: {op: sum(DEPTHS[s] * m[f"{s}_{op}"] for s in STAGES) for op in ("dw", "grn")} for k, m in med.items()}
    lines = ["| op | before ms | after ms | after/before | after, validate=True ms |", "|---|---|---|---|---|"]
    for m in med["before"]:
        b, f, v = med["before"][m], med["after"][m], med["after_validate"][m]
        lines.append(f"| {m} | {b:.3f} | {f:.3f} | {f / b:.3f} | {v:.3f} |")
    for op in ("dw", "grn"):
        b, f, v = step["before"][op], step["after"][op], step["after_validate"][op]
        lines.append(f"| step {op} (x blocks) | {b:.2f} | {f:.2f} | {f / b:.3f} | {v:.2f} |")
    table = "\n".join(lines)
    print(table)
    if a.out:
        sys.path.insert(0, ROOT)
        from sparse_fcmae.machine import machine_info

        payload = {"machine": machine_info(), "args": vars(a), "N": runs["after"][0]["N"], "median_ms": med,
                   "step_ms": step, "runs": runs, "markdown": table}
        with open(a.out, "w") as f:
            json.dump(payload, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
