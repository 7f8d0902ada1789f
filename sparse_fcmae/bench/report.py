"""Render a bench result: markdown tables (leading with sparse vs the best dense-masked configuration)
and a matplotlib figure. Reads schema 1 results too (one configuration per family, no search)."""
from __future__ import annotations

import json
import pathlib
import sys

from .schema import validate


def _fmt(x, spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def _key(r: dict) -> tuple:
    return r["mode"], r["size"], r["batch"], r["img_size"]


def _best_names(r: dict) -> tuple[str | None, str | None]:
    """Schema 2 names the best configurations; schema 1 had one per family."""
    if "best_baseline" in r or "best_dense" in r:
        return r.get("best_baseline"), r.get("best_dense")
    return ("dense_masked" if "dense_masked" in r["variants"] else None,
            "dense" if "dense" in r["variants"] else None)


def _speedup(r: dict) -> float | None:
    q = r["ratios"]
    paired = q.get("sparse_vs_best_baseline_throughput_paired", q.get("sparse_vs_dense_masked_throughput_paired"))
    return paired if paired is not None else q["sparse_vs_dense_masked_throughput"]


def _edge(img: int, dims: int) -> str:
    return f"{img} px" if dims == 2 else f"{img}^3 voxels"


def markdown_table(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    dims = s.get("spatial_dims", 2)
    per_s = "img/s" if dims == 2 else "vol/s"
    layouts = s.get("layouts") or (["channels_last"] if s.get("channels_last", True) else ["nchw"])
    lines = [
        f"# sparse-fcmae bench ({result['created']})",
        "",
        f"Device: {s['device']} ({m['gpu'] or m['cpu_model']}, {m['cpu_cores']} cores, {m['torch_threads']} threads); "
        f"torch {m['torch']}, timm {m['timm']}, MinkowskiEngine {m['minkowskiengine'] or 'not available'}; "
        f"commit {m['git_commit'] or 'unknown'}; load average {m['load_average_start']} -> {m['load_average_end']}.",
        f"Median of {s['steps']} timed steps after {s['warmup']} warm-up steps; {s['dtype']}; "
        f"dense configurations: layouts {', '.join(layouts)}; {', '.join(s.get('executions', ['eager']))}. "
        f"Memory: {s['memory_method']}.",
    ]
    sparse = result["variants"].get("sparse")
    if sparse and sparse.get("available", True):
        lines.append(f"Sparse: {sparse['description']}.")
    if m.get("backends"):
        lines.append("Backends: " + ", ".join(f"{k} {v}" for k, v in m["backends"].items()) + ".")
    if s.get("note"):
        lines.append(f"Note: {s['note']}")
    if s.get("stopped_early"):
        lines.append(f"Stopped early: the time budget ({s['time_budget_s']} s) ran out; later configurations are missing.")
    for v, info in result["variants"].items():
        if not info["available"]:
            lines.append(f"Variant `{v}` not measured: {info['reason']}")
    for key in dict.fromkeys(_key(r) for r in result["results"]):
        mode, size, batch, img = key
        rows = [r for r in result["results"] if _key(r) == key]
        lines += [
            "",
            f"## {mode}, {size}, batch {batch}, {_edge(img, dims)}",
            "",
            "Against the fastest configuration measured of each dense family (paired: median over rounds of the "
            "within-round time ratio).",
            "",
            f"| mask ratio | visible | sparse {per_s} | best dense-masked | {per_s} | sparse / best dense-masked (paired) | "
            f"memory sparse / best dense-masked | best dense | {per_s} | sparse / best dense (paired) | FLOP limit |",
            "|---:|---:|---:|---|---:|---:|---:|---|---:|---:|---:|",
        ]
        for r in rows:
            v, q = r["variants"], r["ratios"]
            bb, bd = _best_names(r)
            paired_d = q.get("sparse_vs_best_dense_throughput_paired", q.get("sparse_vs_dense_throughput_paired"))
            lines.append(
                f"| {r['mask_ratio']:.2f} | {r['visible_fraction']:.2f} | "
                f"{_fmt(v.get('sparse', {}).get('images_per_s'))} | {bb or 'n/a'} | "
                f"{_fmt(v.get(bb, {}).get('images_per_s'))} | "
                f"{_fmt(q['sparse_vs_dense_masked_throughput'], '.2f', 'x')} "
                f"({_fmt(_speedup(r) if bb else None, '.2f', 'x')}) | "
                f"{_fmt(q['sparse_vs_dense_masked_memory'], '.2f', 'x')}{_step_ratio(q)} | {bd or 'n/a'} | "
                f"{_fmt(v.get(bd, {}).get('images_per_s'))} | {_fmt(q['sparse_vs_dense_throughput'], '.2f', 'x')} "
                f"({_fmt(paired_d, '.2f', 'x')}) | {r['flops']['limit_speedup']:.2f}x |"
            )
        lines += ["", "Every configuration:", "",
                  f"| mask ratio | configuration | {per_s} | peak MB | of which steady / step MB | "
                  "sparse speedup over it (paired) | warm-up s | error |",
                  "|---:|---|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            for name, e in r["variants"].items():
                lines.append(f"| {r['mask_ratio']:.2f} | {name} | {_fmt(e['images_per_s'])} | "
                             f"{_fmt(e['peak_mem_mb'], '.0f')} | "
                             f"{_fmt(e.get('steady_mem_mb'), '.0f')} / {_fmt(e.get('step_mem_mb'), '.0f')} | "
                             f"{_fmt(e.get('sparse_speedup_paired'), '.2f', 'x')} | "
                             f"{_fmt(e.get('warmup_s'))} | {e['error'] or ''} |")
        if any(e.get("step_mem_mb") is not None for r in rows for e in r["variants"].values()):
            lines += ["", "Steady: memory held between steps (weights, gradients, optimizer state, caches: the same "
                          "model in every variant); step: the peak above it, what one step adds (the activations, "
                          "and the optimizer's temporaries, the same in every variant). The lead table's `step` "
                          "ratio compares the step parts."]
    lines += fit_lines(result)
    if result["targets"]:
        lines += ["", "## Targets (training step, mask 0.6; sparse vs the best dense-masked configuration)", ""]
        for t in result["targets"]:
            verdict = {True: "met", False: "not met", None: "not measurable"}[t["met"]]
            lines.append(
                f"- {t['size']}, batch {t['batch']}, {_edge(t['img_size'], dims)}: throughput {_fmt(t['throughput_ratio'], '.2f', 'x')} "
                f"(target >= {t['throughput_target']}x), memory {_fmt(t['memory_ratio'], '.2f', 'x')} "
                f"(target <= {t['memory_target']}x): {verdict}"
                + (f"; the step part alone (peak above the steady state) {t['step_memory_ratio']:.2f}x"
                   if t.get("step_memory_ratio") is not None else "")
            )
    return "\n".join(lines) + "\n"


def fit_lines(result: dict) -> list[str]:
    """The memory fit's tables: the lead (sparse against the best of each dense family), then every trial."""
    fit = result.get("fit") or []
    if not fit:
        return []
    dims = result["settings"].get("spatial_dims", 2)
    lines = ["", f"## Memory fit: the largest training batch within {fit[0]['budget_mb'] / 1024:g} GiB", "",
             "Peak memory of one training step (after one untimed step), measured as above; batches tried: doubling "
             f"from 1 up to {fit[0]['max_batch_tried']}, then bisection.", "",
             "| size | input | mask ratio | sparse | best dense-masked | its batch | best dense | its batch | "
             "sparse / best dense-masked |", "|---|---|---:|---:|---|---:|---|---:|---:|"]
    for e in fit:
        (bb, bb_batch), (bd, bd_batch) = fit_best(e, e["best_baseline"], "dense_masked"), fit_best(e, e["best_dense"], "dense")
        lines.append(f"| {e['size']} | {_edge(e['img_size'], dims)} | {e['mask_ratio']:.2f} | "
                     f"{fit_batch(e, 'sparse')} | {bb} | {bb_batch} | {bd} | {bd_batch} | "
                     f"{_fmt(e['sparse_vs_best_baseline_batch'], '.1f', 'x')}"
                     f"{' or more' if fit_capped(e, 'sparse') and e['sparse_vs_best_baseline_batch'] else ''} |")
    lines += ["", "Every configuration (batch: peak MB; a miss marked x):", "",
              "| size | input | mask ratio | configuration | largest batch | its peak MB | trials |", "|---|---|---:|---|---:|---:|---|"]
    for e in fit:
        for name, r in e["variants"].items():
            tried = ", ".join(f"{t['batch']}: {_fmt(t['peak_mem_mb'], '.0f')}{'' if t['fits'] else ' x'}"
                              for t in sorted(r["trials"], key=lambda t: t["batch"]))
            lines.append(f"| {e['size']} | {_edge(e['img_size'], dims)} | {e['mask_ratio']:.2f} | {name} | "
                         f"{fit_batch(e, name)} | {_fmt(r['peak_mem_mb'], '.0f')} | {tried} |")
    return lines


def fit_capped(entry: dict, name: str | None) -> bool:
    """Whether the configuration fit the largest batch tried (it may fit more)."""
    return bool(name) and entry["variants"][name]["max_batch"] == entry["max_batch_tried"]


def fit_best(entry: dict, best: str | None, family: str) -> tuple[str, str]:
    """``(name, largest batch)`` cells of a dense family's best configuration in a fit entry: ``none fits`` / 0
    where the family was measured and nothing fit, ``not measured`` / n/a where it was not run at all."""
    if best:
        return best, fit_batch(entry, best)
    if any(n == family or n.startswith(family + "[") for n in entry["variants"]):
        return "none fits", "0"
    return "not measured", "n/a"


def fit_batch(entry: dict, name: str | None) -> str:
    """A configuration's largest batch, marked where the search stopped at its cap rather than at a miss."""
    if not name or name not in entry["variants"]:  # none of the family fits (or it was not measured)
        return "0"
    b = entry["variants"][name]["max_batch"]
    return f"{b} (the most tried)" if fit_capped(entry, name) else str(b)


def _step_ratio(ratios: dict) -> str:
    """`` (step R)``: sparse / best dense-masked over the step part of the memory (peak above steady)."""
    a = ratios.get("sparse_vs_best_baseline_step_memory")
    return "" if a is None else f" (step {a:.2f}x)"


def plot_png(result: dict, path: pathlib.Path) -> None:
    """Per (mode, size, batch, image size): images/s and peak memory of every configuration against
    the mask ratio, and sparse / best dense-masked (paired) beside the FLOP limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..checkpoint import atomic_write

    keys = list(dict.fromkeys(_key(r) for r in result["results"])) or [None]
    fig, axes = plt.subplots(len(keys), 3, figsize=(16, 4.2 * len(keys)), squeeze=False)
    dev = result["machine"]["gpu"] or result["machine"]["cpu_model"] or result["settings"]["device"]
    fig.suptitle(f"sparse-fcmae bench: {dev}, {result['settings']['dtype']} ({result['created']})")
    names = list(result["variants"])
    colors = {"sparse": "tab:red", "dense_masked": "tab:blue", "dense": "tab:green"}
    for row, key in enumerate(keys):
        rows = [r for r in result["results"] if key and _key(r) == key]
        ax_tp, ax_mem, ax_sp = axes[row]
        for name in names:
            family = result["variants"][name].get("family", name.split("[")[0])
            style = dict(color=colors.get(family, "black"), marker="o", markersize=3,
                         linestyle="--" if result["variants"][name].get("compiled") else "-",
                         alpha=1.0 if family == "sparse" or "nchw" not in name else 0.6,
                         linewidth=2.2 if family == "sparse" else 1.2, label=name)
            for ax, metric in ((ax_tp, "images_per_s"), (ax_mem, "peak_mem_mb")):
                pts = [(r["mask_ratio"], r["variants"].get(name, {}).get(metric)) for r in rows]
                pts = sorted((a, b) for a, b in pts if b is not None)
                if pts:
                    ax.plot(*zip(*pts), **style)
        pts = [(r["mask_ratio"], _speedup(r)) for r in rows]
        pts = sorted((a, b) for a, b in pts if b is not None)
        if pts:
            ax_sp.plot(*zip(*pts), color="tab:red", marker="o", label="sparse / best dense-masked (paired)")
        limit = sorted((r["mask_ratio"], r["flops"]["limit_speedup"]) for r in rows)
        if limit:
            ax_sp.plot(*zip(*limit), color="grey", linestyle=":", label="FLOP limit")
        ax_sp.axhline(1.0, color="black", linewidth=0.5)
        title = "no data" if key is None else f"{key[0]}, {key[1]}, batch {key[2]}, {key[3]} px"
        for ax, ylabel in ((ax_tp, "images/s"), (ax_mem, "peak memory (MB)"), (ax_sp, "speedup")):
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("mask ratio")
            ax.set_ylabel(ylabel)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        if row == 0 and rows:  # a fit-only result has no rows to label
            ax_tp.legend(fontsize=7)
            ax_sp.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)


def write_outputs(result: dict, out: pathlib.Path, label: str, with_json: bool = True) -> dict[str, pathlib.Path]:
    """``<label>.json``, ``<label>.md``, ``<label>.png`` under ``out`` (each written atomically). A re-rendering
    (``with_json=False``) leaves the JSON alone: a result file is written only by the run that measured it."""
    from ..checkpoint import atomic_write

    validate(result)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{label}.json", "md": out / f"{label}.md", "png": out / f"{label}.png"}
    if with_json:
        atomic_write(paths["json"], lambda f: f.write((json.dumps(result, indent=1) + "\n").encode()))
    else:
        del paths["json"]
    atomic_write(paths["md"], lambda f: f.write(markdown_table(result).encode()))
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the GPU image has none: the JSON is the result, the figure can follow (--from-json)
        print("bench: matplotlib is not installed, so no PNG; render it later with `sparse-fcmae bench --from-json`",
              file=sys.stderr)
        del paths["png"]
        return paths
    plot_png(result, paths["png"])
    return paths
