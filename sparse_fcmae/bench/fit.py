"""Memory fit (``--mem-budget-gb``): the largest training batch each configuration fits in a memory budget.

Each trial is one worker process (the throughput workers' code) that builds the configuration on the shared
weights, runs one untimed training step (AdamW state allocated), resets the peak, runs one more and reports its
peak: the same measure as the throughput rows (CUDA: ``max_memory_allocated``; CPU: peak RSS), minus what the
worker held before the model was built. A batch fits when that step ran and its peak is within the budget; a
worker that fails (CUDA out of memory, killed by the kernel) does not fit. The batch doubles from 1 until a trial
does not fit (or ``fit_max_batch`` is reached), then bisects between the last fit and the first miss.
"""
from __future__ import annotations

import os

from ..checkpoint import save_checkpoint
from .options import BenchOptions, Config
from .variants import bench_inputs, bench_masks
from .worker import Worker


def _trial(ctx, opts: BenchOptions, opts_dict: dict, config: Config, size: str, state: dict, img: int, ratio: float,
           batch: int, tmp: str) -> dict:
    path = os.path.join(tmp, f"fit-{size}-{img}-{batch}.pth")
    if not os.path.exists(path):
        save_checkpoint({"state": state, "images": bench_inputs(opts, batch, img)}, path)
    w = Worker(ctx, config, size, path, opts_dict)
    try:
        w.recv()
        peak = None
        if not w.error:
            grid = (img // 32,) * opts.spatial_dims
            w.send("config", "train", bench_masks(opts, batch, grid, ratio, 2), 1, ratio)
            w.recv()
            if not w.error:
                w.ask("step", 1)
            if not w.error:
                answer = w.ask("peak")
                peak = None if answer is None else answer[0]
    finally:
        w.close()
    budget_mb = opts.mem_budget_gb * 1024
    fits = w.error is None and peak is not None and peak <= budget_mb
    return {"batch": batch, "peak_mem_mb": peak, "fits": fits, "error": w.error}


def largest_batch(trial, max_batch: int) -> tuple[int, list[dict]]:
    """``(largest fitting batch (0: none), trials)``: double from 1 until a miss or ``max_batch``, then bisect."""
    trials, good, bad = [], 0, None
    b = 1
    while b <= max_batch:
        trials.append(trial(b))
        if not trials[-1]["fits"]:
            bad = b
            break
        good = b
        if b == max_batch:
            break
        b = min(2 * b, max_batch)
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        trials.append(trial(mid))
        good, bad = (mid, bad) if trials[-1]["fits"] else (good, mid)
    return good, trials


def run_fit(opts: BenchOptions, opts_dict: dict, ctx, tmp: str, configs: list[Config], states: dict,
            bar=None) -> list[dict]:
    """One entry per (size, edge, mask ratio): every configuration's largest batch within the budget."""
    out = []
    for size in opts.sizes:
        for img in opts.img_sizes:
            for ratio in opts.mask_ratios:
                entry = {"size": size, "img_size": img, "mask_ratio": ratio, "budget_mb": opts.mem_budget_gb * 1024,
                         "max_batch_tried": opts.fit_max_batch, "variants": {}}
                for config in configs:
                    if bar is not None:
                        bar.set_description(f"memory fit {size} {img} mask {ratio:.2f} {config.name}")

                    args = (ctx, opts, opts_dict, config, size, states[size], img, ratio)
                    best, trials = largest_batch(lambda b, args=args: _trial(*args, b, tmp), opts.fit_max_batch)
                    at = next((t["peak_mem_mb"] for t in trials if t["batch"] == best and t["fits"]), None)
                    entry["variants"][config.name] = {"max_batch": best, "peak_mem_mb": at, "trials": trials}
                entry.update(fit_ratios(entry["variants"]))
                out.append(entry)
    return out


def fit_ratios(variants: dict) -> dict:
    """The best configuration of each dense family (largest batch, then smallest peak) and sparse's batch over it."""
    def best(family):
        ok = [(v["max_batch"], -(v["peak_mem_mb"] or 0), n) for n, v in variants.items()
              if n.split("[")[0] == family and v["max_batch"] > 0]
        return max(ok)[2] if ok else None

    bb, bd = best("dense_masked"), best("dense")
    s = variants.get("sparse", {}).get("max_batch")

    def ratio(name):
        b = variants[name]["max_batch"] if name else 0
        return None if s is None or not b else s / b

    return {"best_baseline": bb, "best_dense": bd, "sparse_vs_best_baseline_batch": ratio(bb),
            "sparse_vs_best_dense_batch": ratio(bd)}
