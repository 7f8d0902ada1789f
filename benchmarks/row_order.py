"""Row order of the strided stages: the sparse kernels on the model's own stage tables, with the rows in
MinkowskiEngine's hash order (its ``manager.stride`` map, what training used until issue 16 item 4) and in
sample-then-raster order (``sparse.child_table`` now), side by side in one run, repeats interleaved.

Stage tables come from the real path (``to_sparse`` of a masked batch, then ``child_table`` per stage), not
from a raster grid: ``kernels.py``'s stage-2 rows are raster-ordered by construction. Per stage: depthwise
7x7 fwd+bwd and GRN fwd+bwd (4C channels), median ms, and the median distance between a row and its
neighbours' rows. Writes JSON with machine info and the commit.

  python benchmarks/row_order.py --out benchmarks/results/row_order_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import MinkowskiEngine as ME  # noqa: E402

from sparse_fcmae.checkpoint import atomic_write  # noqa: E402
from sparse_fcmae.machine import git_commit, machine_info  # noqa: E402
from sparse_fcmae.masking import random_patch_mask, upsample_mask  # noqa: E402
from sparse_fcmae.models.sizes import get_size  # noqa: E402
from sparse_fcmae.ops import batch_segments, sparse_depthwise_conv, sparse_grn  # noqa: E402
from sparse_fcmae.sparse import child_table, neighbor_table, to_sparse  # noqa: E402


def stages(batch: int, img: int, ratio: float, seed: int):
    """Per stage 1..4: (raster-ordered tensor, hash-ordered tensor) over the same sites."""
    g = img // 32
    mask = random_patch_mask(batch, (g, g), ratio, generator=torch.Generator().manual_seed(seed))
    x = to_sparse(torch.zeros(batch, 1, img // 4, img // 4), upsample_mask(mask, (g, g), 8))
    raster, hashed = [x], [x]
    for _ in range(3):
        key, children = child_table(raster[-1], 2)
        raster.append(ME.SparseTensor(torch.zeros(children.shape[0], 1), coordinate_map_key=key,
                                      coordinate_manager=x.coordinate_manager))
        hkey = x.coordinate_manager.stride(hashed[-1].coordinate_map_key, [2, 2])
        hashed.append(ME.SparseTensor(torch.zeros(x.coordinate_manager.size(hkey), 1), coordinate_map_key=hkey,
                                      coordinate_manager=x.coordinate_manager))
    return list(zip(raster, hashed))


def closures(s: ME.SparseTensor, c: int, batch: int, seed: int):
    table = neighbor_table(s, 7)
    n = table.shape[0]
    b = s.C[:, 0].long().contiguous()
    seg = batch_segments(b, batch)
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, c, generator=g).requires_grad_()
    kernel = (torch.randn(49, c, generator=g) * 0.1).requires_grad_()
    bias = torch.randn(1, c, generator=g).requires_grad_()
    gout = torch.randn(n, c, generator=g)
    x4 = torch.randn(n, 4 * c, generator=g).requires_grad_()
    gamma, beta = torch.randn(1, 4 * c, generator=g).requires_grad_(), torch.randn(1, 4 * c, generator=g).requires_grad_()
    g4 = torch.randn(n, 4 * c, generator=g)

    def dw():
        sparse_depthwise_conv(feats, table, kernel, bias, symmetric=True, validate=False).backward(gout)

    def grn():
        sparse_grn(x4, b, batch, gamma, beta, segments=seg, validate=False).backward(g4)

    rows = torch.arange(n).unsqueeze(1)
    dist = (table.long() - rows).abs()[table >= 0].float()
    return {"dw": dw, "grn": grn}, n, float(dist.median()) if dist.numel() else 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="atto,tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--mask-ratio", type=float, default=0.6)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall",
                    help="thread: this thread's CPU time (with --threads 1: robust to other load on the machine)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    clock = time.thread_time if a.clock == "thread" else time.perf_counter
    rows = []
    for size in a.sizes.split(","):
        dims = get_size(size)[1]
        for i, (ras, hsh) in enumerate(stages(a.batch, a.img_size, a.mask_ratio, seed=0)):
            (fr, n, dr), (fh, _, dh) = closures(ras, dims[i], a.batch, 1), closures(hsh, dims[i], a.batch, 1)
            if a.threads:  # again: MinkowskiEngine resets torch's thread count when it builds a coordinate manager
                torch.set_num_threads(a.threads)
            times = {f"{op}_{order}": [] for op in fr for order in ("raster", "hash")}
            for op in fr:
                for _ in range(a.warmup):
                    fr[op](), fh[op]()
                for _ in range(a.repeats):  # interleaved: load drift hits both orders alike
                    for order, f in (("raster", fr[op]), ("hash", fh[op])):
                        t0 = clock()
                        f()
                        times[f"{op}_{order}"].append((clock() - t0) * 1e3)
            ms = {k: round(statistics.median(v), 4) for k, v in times.items()}
            row = {"size": size, "stage": i + 1, "C": dims[i], "N": n, "median_row_distance": {"raster": dr, "hash": dh},
                   "ms": ms, "dw_hash_over_raster": ms["dw_hash"] / ms["dw_raster"],
                   "grn_hash_over_raster": ms["grn_hash"] / ms["grn_raster"]}
            rows.append(row)
            print(f"[row_order] {size} stage {i + 1} C{dims[i]} N{n}: row distance {dh:.0f} -> {dr:.0f}; dw fwd+bwd "
                  f"{ms['dw_hash']:.3f} -> {ms['dw_raster']:.3f} ms ({row['dw_hash_over_raster']:.2f}x), GRN "
                  f"{ms['grn_hash']:.3f} -> {ms['grn_raster']:.3f} ms ({row['grn_hash_over_raster']:.2f}x)", flush=True)
    info = machine_info()
    md = [f"{info.get('cpu_model') or 'CPU'}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{'CPU time of the thread' if a.clock == 'thread' else 'wall time'}, median of {a.repeats} interleaved runs, "
          f"batch {a.batch}, {a.img_size} px, mask {a.mask_ratio}, commit {str(git_commit())[:7]}:", "",
          "| size | stage | C | rows | median neighbour-row distance, hash -> raster | depthwise fwd+bwd ms, hash -> raster "
          "| GRN fwd+bwd ms, hash -> raster |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        d, ms = r["median_row_distance"], r["ms"]
        md.append(f"| {r['size']} | {r['stage']} | {r['C']} | {r['N']} | {d['hash']:.0f} -> {d['raster']:.0f} | "
                  f"{ms['dw_hash']:.3f} -> {ms['dw_raster']:.3f} (**{r['dw_hash_over_raster']:.2f}x**) | "
                  f"{ms['grn_hash']:.3f} -> {ms['grn_raster']:.3f} ({r['grn_hash_over_raster']:.2f}x) |")
    result = {"what": "sparse kernels on the model's stage tables: ME hash row order vs sample-then-raster order",
              "commit": git_commit(), "machine": info, "torch_threads": torch.get_num_threads(),
              "options": vars(a), "rows": rows, "markdown": "\n".join(md) + "\n"}
    atomic_write(a.out, lambda f: f.write(json.dumps(result, indent=2).encode()))
    print(f"[row_order] written {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
