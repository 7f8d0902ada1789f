"""Drive the workers through every configuration and assemble the result rows.

Order of a run, per (size, batch, image size): the sparse worker lives throughout; the dense
configurations come in groups (one per execution and layout, eager first), each group's workers
alive together with the sparse one, for every mode and mask ratio. Within a row the workers step in
lock step, rotating who goes first, so each dense configuration has a paired speedup against the
sparse step measured in the same rounds. The sparse step is measured once per group; its row entry
pools those times (median) and takes the largest peak.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import pathlib
import sys
import tempfile
import time

from ..machine import load_average, machine_info
from .fit import run_fit
from .options import FAMILY_DESCRIPTIONS, BenchOptions
from .schema import SCHEMA_ID
from .variants import bench_inputs, bench_masks, build_reference_state, count_flops
from .worker import Worker

# Training step, mask 0.6: sparse / best dense-masked configuration, throughput (paired) and peak memory, as
# (size, batch, edge, throughput target, memory target) per (device, spatial dims). Images: CPU atto batch 8
# (issue 6), GPU tiny batch 64 (issue 11), 224 px; volumes: femto batch 2, 64^3 (issue 15). Reported, never asserted.
TARGETS = {("cpu", 2): ("atto", 8, 224, 2.0, 0.5), ("cuda", 2): ("tiny", 64, 224, 2.0, 0.4),
           ("cpu", 3): ("femto", 2, 64, 2.0, 0.5), ("cuda", 3): ("femto", 2, 64, 2.0, 0.5)}


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


class _Row:
    """What the groups measured of one (mode, mask ratio): step times, peaks, paired speedups, errors."""

    def __init__(self):
        self.times: dict[str, list[float]] = {}
        self.peaks: dict[str, float] = {}
        self.steady: dict[str, float] = {}  # memory held between steps (weights, gradients, optimizer state)
        self.errors: dict[str, str] = {}
        self.paired: dict[str, float] = {}  # config -> median over rounds of t_config / t_sparse
        self.warmup_s: dict[str, float] = {}
        self.graphs: dict[str, int] = {}

    def entries(self, batch: int) -> dict[str, dict]:
        out = {}
        for name in list(self.times) + [n for n in self.errors if n not in self.times]:
            t = self.times.get(name, [])
            if name in self.errors or not t:
                out[name] = {"images_per_s": None, "median_s": None, "step_times_s": t, "peak_mem_mb": None,
                             "error": self.errors.get(name, "not measured")}
                continue
            med = _median(t)
            peak, steady = self.peaks.get(name), self.steady.get(name)
            out[name] = {"images_per_s": batch / med, "median_s": med, "step_times_s": t,
                         "peak_mem_mb": peak, "error": None,
                         "warmup_s": self.warmup_s.get(name), "compiled_graphs": self.graphs.get(name),
                         "steady_mem_mb": steady,
                         "step_mem_mb": None if peak is None or steady is None else max(peak - steady, 0.0)}
            if name in self.paired:
                out[name]["sparse_speedup_paired"] = self.paired[name]
        return out


def _best(entries: dict[str, dict], family: str) -> str | None:
    """The fastest configuration of ``family`` measured without error in this row."""
    ok = [(v["images_per_s"], n) for n, v in entries.items()
          if n.split("[")[0] == family and v["error"] is None and v["images_per_s"]]
    return max(ok)[1] if ok else None


def row_ratios(entries: dict[str, dict]) -> tuple[str | None, str | None, dict]:
    """``(best_baseline, best_dense, ratios)`` of one row."""
    bb, bd = _best(entries, "dense_masked"), _best(entries, "dense")
    s = entries.get("sparse", {})

    def get(name, key):
        return entries.get(name, {}).get(key) if name else None

    tp_s, mem_s = s.get("images_per_s"), s.get("peak_mem_mb")
    r = {
        "sparse_vs_best_baseline_throughput": _ratio(tp_s, get(bb, "images_per_s")),
        "sparse_vs_best_baseline_throughput_paired": get(bb, "sparse_speedup_paired") if tp_s else None,
        "sparse_vs_best_baseline_memory": _ratio(mem_s, get(bb, "peak_mem_mb")),
        # the peak above the steady state (weights, gradients, optimizer state: the same in every variant)
        "sparse_vs_best_baseline_step_memory": _ratio(s.get("step_mem_mb"), get(bb, "step_mem_mb")),
        "sparse_vs_best_dense_throughput": _ratio(tp_s, get(bd, "images_per_s")),
        "sparse_vs_best_dense_throughput_paired": get(bd, "sparse_speedup_paired") if tp_s else None,
        "best_baseline_vs_best_dense_throughput": _ratio(get(bb, "images_per_s"), get(bd, "images_per_s")),
    }
    # schema 1's names, kept for readers of older results: against the best configurations
    r.update({
        "sparse_vs_dense_masked_throughput": r["sparse_vs_best_baseline_throughput"],
        "sparse_vs_dense_masked_throughput_paired": r["sparse_vs_best_baseline_throughput_paired"],
        "sparse_vs_dense_masked_memory": r["sparse_vs_best_baseline_memory"],
        "sparse_vs_dense_throughput": r["sparse_vs_best_dense_throughput"],
        "sparse_vs_dense_throughput_paired": r["sparse_vs_best_dense_throughput_paired"],
        "dense_masked_vs_dense_throughput": r["best_baseline_vs_best_dense_throughput"],
    })
    return bb, bd, r


def run_benchmark(opts: BenchOptions) -> dict:
    """Run every configuration; returns the result dict (see ``sparse_fcmae.bench``)."""
    import multiprocessing as mp

    from tqdm import tqdm

    from ..checkpoint import save_checkpoint
    from ..masking import num_kept

    cuda = opts.device == "cuda"
    unit = "px" if opts.spatial_dims == 2 else "^3"
    machine = machine_info()
    machine["backends"]["cudnn_benchmark_in_workers"] = cuda  # each worker sets it (the parent does not)
    machine["load_average_end"] = None
    memory_method = (
        "torch.cuda.max_memory_allocated minus the worker's allocation before the model was built"
        if cuda else
        "peak RSS (VmHWM, reset per configuration via /proc/self/clear_refs after malloc_trim) minus the "
        "worker's RSS before the model was built"
    )
    sparse_cfg = opts.sparse_config()
    groups = opts.groups()
    configs = ([sparse_cfg] if sparse_cfg else []) + [c for g in groups for c in g]
    result = {
        "schema": SCHEMA_ID,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "settings": {
            "device": opts.device, "sizes": list(opts.sizes), "batches": list(opts.batches),
            "img_sizes": list(opts.img_sizes), "mask_ratios": list(opts.mask_ratios), "modes": list(opts.modes),
            "variants": list(opts.variants), "layouts": list(opts.layouts), "executions": list(opts.executions),
            "sparse_layout": opts.sparse_layout, "sparse_compile": opts.sparse_compile,
            "sparse_graph": sparse_cfg is not None and sparse_cfg.graph, "warmup": opts.warmup, "steps": opts.steps, "seed": opts.seed,
            "in_chans": opts.in_chans, "decoder_dim": opts.decoder_dim, "decoder_depth": opts.decoder_depth,
            "dtype": "float32" if opts.precision == "fp32" else "bfloat16 autocast (float32 weights)",
            "memory_method": memory_method, "note": opts.note, "time_budget_s": opts.time_budget_s,
            "stopped_early": False, "spatial_dims": opts.spatial_dims, "mem_budget_gb": opts.mem_budget_gb,
            "fit_max_batch": opts.fit_max_batch, "fit_only": opts.fit_only,
        },
        "variants": {c.name: {"available": True, "reason": None, "description": c.describe(opts.spatial_dims), "family": c.family,
                              "layout": c.layout, "compiled": c.compiled, "graph": c.graph} for c in configs},
        "results": [],
        "targets": [],
    }
    assert set(FAMILY_DESCRIPTIONS) >= {c.family for c in configs}
    opts_dict = {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(opts).items()}
    sizes = [] if opts.fit_only else [(s, b, i) for s in opts.sizes for b in opts.batches for i in opts.img_sizes]
    per_row = sum(len(g) + (1 if sparse_cfg else 0) for g in groups) * opts.steps
    bar = tqdm(total=len(sizes) * len(opts.modes) * len(opts.mask_ratios) * per_row, disable=not opts.progress,
               unit="step", dynamic_ncols=True, file=sys.stderr)
    # CPU: forkserver, whose server imports the heavy libraries once; each worker then starts as a cheap
    # fork of a process that never ran torch compute. CUDA: spawn, since a library import that touches the
    # driver (an availability check) would leave every fork of the server unable to use the GPU.
    t_start = time.monotonic()
    use_fork = not cuda and "forkserver" in mp.get_all_start_methods()
    ctx = mp.get_context("forkserver" if use_fork else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["torch", "timm", "sparse_fcmae.bench", "sparse_fcmae.models"])

    def over_budget() -> bool:
        return opts.time_budget_s is not None and time.monotonic() - t_start > opts.time_budget_s

    def start(workers: list[Worker]) -> list[Worker]:
        """Wait for the workers to build their models; those that failed are recorded and closed."""
        alive = []
        for w in workers:
            w.info = w.recv() or {}
            if w.error:
                result["variants"][w.name].update(available=False, reason=w.error)
                w.close()
            else:
                alive.append(w)
        if not cuda and not all(w.info.get("memory_resettable", True) for w in alive):
            result["settings"]["memory_method"] = (
                "running peak RSS (VmHWM could not be reset: /proc/self/clear_refs not writable) minus "
                "the worker's RSS before the model was built")
        return alive

    with tempfile.TemporaryDirectory(prefix="sparse-fcmae-bench-") as tmp:
        for size, batch, img in sizes:
            grid = (img // 32,) * opts.spatial_dims
            state = build_reference_state(opts, size)
            images = bench_inputs(opts, batch, img)
            state_path = os.path.join(tmp, f"{size}-{batch}-{img}.pth")
            save_checkpoint({"state": state, "images": images}, state_path)
            rows = {(m, r): _Row() for m in opts.modes for r in opts.mask_ratios}
            measured: list[tuple[str, float]] = []  # (mode, ratio) in the order first measured
            bar.set_description(f"{size} b{batch} {img}{unit}: starting workers")
            sparse_w = start([Worker(ctx, sparse_cfg, size, state_path, opts_dict)]) if sparse_cfg else []
            try:
                for group in groups:
                    if over_budget() and measured:
                        result["settings"]["stopped_early"] = True
                        break
                    dense_ws = start([Worker(ctx, c, size, state_path, opts_dict) for c in group])
                    workers = sparse_w + dense_ws
                    if not workers:  # every configuration of the group failed to start (reasons recorded)
                        continue
                    try:
                        for mode in opts.modes:
                            for ratio in opts.mask_ratios:
                                if over_budget() and measured:  # at least one row is always measured
                                    result["settings"]["stopped_early"] = True  # what was measured is kept
                                    break
                                _measure(opts, workers, rows[(mode, ratio)], mode, ratio,
                                         bench_masks(opts, batch, grid, ratio, opts.warmup + opts.steps), bar,
                                         f"{mode} {size} b{batch} {img}{unit} mask {ratio:.2f}")
                                if (mode, ratio) not in measured:
                                    measured.append((mode, ratio))
                    finally:
                        for w in dense_ws:
                            w.close()
                for w in sparse_w:
                    if w.dead:
                        result["variants"][w.name].update(available=False, reason=w.error)
            finally:
                for w in sparse_w:
                    w.close()
            for mode in opts.modes:  # rows in the options' order, whatever the budget left out
                for ratio in opts.mask_ratios:
                    if (mode, ratio) not in measured:
                        continue
                    dense_gf, stages_gf = count_flops(opts, size, batch, img, mode)
                    patches = math.prod(grid)
                    vis = num_kept(patches, ratio) / patches
                    ideal = dense_gf - (1.0 - vis) * stages_gf
                    entries = rows[(mode, ratio)].entries(batch)
                    best_baseline, best_dense, ratios = row_ratios(entries)
                    result["results"].append({
                        "mode": mode, "size": size, "batch": batch, "img_size": img, "mask_ratio": ratio,
                        "visible_fraction": vis,
                        "flops": {"dense_gflops": dense_gf, "stages_gflops": stages_gf,
                                  "sparse_ideal_gflops": ideal, "limit_speedup": dense_gf / ideal},
                        "variants": entries, "best_baseline": best_baseline, "best_dense": best_dense,
                        "ratios": ratios,
                    })
        if opts.mem_budget_gb is not None:
            states = {size: build_reference_state(opts, size) for size in opts.sizes}
            result["fit"] = run_fit(opts, opts_dict, ctx, tmp, configs, states, bar)
    bar.close()
    if not result["results"] and not result.get("fit"):
        failed = "; ".join(f"{name}: {v['reason']}" for name, v in result["variants"].items() if v.get("reason"))
        raise RuntimeError(f"no configuration could run ({failed or 'no reason recorded'})")
    machine["load_average_end"] = load_average()
    result["targets"] = targets(result)
    return result


def _measure(opts: BenchOptions, workers: list[Worker], row: _Row, mode: str, ratio: float, masks, bar,
             what: str) -> None:
    """One row for one group: warm-up side by side, then ``steps`` lock-step rounds."""
    bar.set_description(f"{what}: warm-up")
    for w in workers:
        w.clear()
        w.send("config", mode, masks, opts.warmup, ratio)
    for w in workers:
        warm = w.recv()
        if warm is not None:
            row.warmup_s[w.name] = max(row.warmup_s.get(w.name, 0.0), warm)
    times = {w.name: [] for w in workers}
    for i in range(opts.steps):
        k = i % len(workers)
        for w in workers[k:] + workers[:k]:  # rotate: no configuration always runs first
            if w.error:
                continue
            bar.set_description(f"{what} {w.name}")
            dt = w.ask("step", opts.warmup + i)
            if dt is not None:
                times[w.name].append(dt)
            bar.update(1)
    for w in workers:
        if w.error:
            row.errors[w.name] = w.error
            continue
        answer = w.ask("peak")
        if w.error:
            row.errors[w.name] = w.error
            continue
        peak, row.graphs[w.name], steady = answer
        row.times.setdefault(w.name, []).extend(times[w.name])
        row.peaks[w.name] = max(row.peaks.get(w.name, 0.0), peak)
        row.steady[w.name] = min(row.steady.get(w.name, steady), steady)  # with the largest peak: the widest span
    ts = times.get("sparse")
    if ts and "sparse" not in row.errors:
        for w in workers:
            t = times[w.name]
            if w.name != "sparse" and w.name not in row.errors and len(t) == len(ts):
                row.paired[w.name] = _median([b / a for a, b in zip(ts, t)])


def targets(result: dict) -> list[dict]:
    """The target rows (training step, mask 0.6; ``TARGETS``) wherever this run measured them."""
    s = result["settings"]
    size, batch, img, t_target, m_target = TARGETS[(s["device"], s.get("spatial_dims", 2))]
    out = []
    for r in result["results"]:
        if (r["mode"], r["size"], r["batch"], r["img_size"]) == ("train", size, batch, img) and abs(r["mask_ratio"] - 0.6) < 1e-9:
            q = r["ratios"]
            tr = q.get("sparse_vs_best_baseline_throughput_paired") or q["sparse_vs_dense_masked_throughput"]
            mr = q["sparse_vs_dense_masked_memory"]
            met = None if tr is None or mr is None else bool(tr >= t_target and mr <= m_target)
            out.append({"mode": "train", "size": size, "batch": batch, "img_size": img, "mask_ratio": 0.6,
                        "throughput_ratio": tr, "memory_ratio": mr, "throughput_target": t_target,
                        "memory_target": m_target, "met": met,
                        "step_memory_ratio": q.get("sparse_vs_best_baseline_step_memory")})
    return out
