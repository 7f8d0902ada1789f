"""Fill the measured numbers in README.md and docs/*.md from the committed result files.

A rendered block sits between ``<!-- render KIND PATH [PATH...] -->`` and ``<!-- end render -->``;
everything between is replaced by what KIND renders from the JSON file(s) at PATH (relative to the
repository root), so no number in a block is typed by hand. Kinds:

* ``bench``: the tables of a ``sparse-fcmae bench`` result (``sparse_fcmae.bench.report``);
* ``bench-lead``: only its lead tables (sparse against the best configuration of each dense family);
* ``headline``: one row per bench result (precision, sparse and best dense-masked images/s, paired
  speedup, memory ratio, commit) at the training step, mask 0.6;
* ``volume-headline``: volumes (``bench --spatial-dims 3``): the training-step rows at mask 0.6 (sparse against
  the best dense-masked configuration: paired speedup, the range over every dense-masked configuration, memory)
  and the memory fit (the largest batch each family fits in the budget);
* ``kernels``: the table ``benchmarks/kernels.py`` wrote into its JSON;
* ``image-build``: one row per image build ``scripts/build_image.sh`` recorded (time, ME wheel cache, size);
* ``image-smoke``: the smoke test output and the build log's last lines of one such record;
* ``data-cores``: a ``sparse-fcmae bench-data`` result's one-worker rates, and the decode cores per GPU they imply
  at the sparse training throughput of the GPU bench results named after it (``data-cores-line``: one sentence).

    python benchmarks/render_docs.py           # rewrite the blocks
    python benchmarks/render_docs.py --check   # exit 1 if a block is stale (a test runs this)
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparse_fcmae.bench.report import fit_batch, fit_best, markdown_table  # noqa: E402

BLOCK = re.compile(r"(<!-- render (\S+) ([^>]*?) -->\n)(.*?)(<!-- end render -->)", re.S)


def _load(path: str) -> dict:
    return json.loads((ROOT / path).read_text())


def _demote(md: str, levels: int = 2) -> str:
    return re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + levels) + " ", md, flags=re.M)


def render_bench(paths: list[str], lead_only: bool = False) -> str:
    out = []
    for p in paths:
        md = markdown_table(_load(p)).split("\n", 1)[1]  # drop the title line
        if lead_only:
            md = re.sub(r"\nEvery configuration:\n.*?(?=\n## |\Z)", "\n", md, flags=re.S)
        out.append(f"From `{p}`:\n" + _demote(md).strip() + "\n")
    return "\n".join(out)


def render_headline(paths: list[str]) -> str:
    lines = ["| result | precision | sparse img/s | best dense-masked configuration | its img/s | "
             "sparse / best (paired) | peak memory sparse / best | commit |",
             "|---|---|---:|---|---:|---:|---:|---|"]
    for p in paths:
        res = _load(p)
        for r in res["results"]:
            if r["mode"] != "train" or abs(r["mask_ratio"] - 0.6) > 1e-9:
                continue
            v, q, best = r["variants"], r["ratios"], r.get("best_baseline")
            dtype = "bf16 autocast" if res["settings"]["dtype"].startswith("bfloat16") else "fp32"
            lines.append(
                f"| `{pathlib.Path(p).name}` | {dtype} | {v['sparse']['images_per_s']:.0f} | {best} | "
                f"{v[best]['images_per_s']:.0f} | **{q['sparse_vs_best_baseline_throughput_paired']:.2f}x** | "
                f"{q['sparse_vs_best_baseline_memory']:.2f}x | {res['machine']['git_commit'][:7]} |")
    return "\n".join(lines) + "\n"


def render_volume_headline(paths: list[str]) -> str:
    rows, fits = [], []
    for p in paths:
        res = _load(p)
        name, commit = pathlib.Path(p).name, res["machine"]["git_commit"][:7]
        for r in res["results"]:
            if r["mode"] != "train" or abs(r["mask_ratio"] - 0.6) > 1e-9:
                continue
            v, q, best = r["variants"], r["ratios"], r.get("best_baseline")
            paired = sorted(e["sparse_speedup_paired"] for n, e in v.items()
                            if n.startswith("dense_masked") and e.get("sparse_speedup_paired") is not None)
            rows.append(f"| `{name}` | {r['size']}, batch {r['batch']}, {r['img_size']}^3 | {best} | "
                        f"**{q['sparse_vs_best_baseline_throughput_paired']:.2f}x** | {paired[0]:.2f}x - {paired[-1]:.2f}x | "
                        f"{q['sparse_vs_best_baseline_memory']:.2f}x | {commit} |")
        for e in res.get("fit") or []:
            (bb, bb_batch), (_, bd_batch) = fit_best(e, e["best_baseline"], "dense_masked"), fit_best(e, e["best_dense"], "dense")
            fits.append(f"| `{name}` | {e['size']}, {e['img_size']}^3, mask {e['mask_ratio']:.2f} | "
                        f"{e['budget_mb'] / 1024:g} GiB | **{fit_batch(e, 'sparse')}** | "
                        f"{bb_batch} ({bb}) | {bd_batch} | {commit} |")
    out = []
    if rows:
        out += ["| result | training step | best dense-masked configuration | sparse / best (paired) | "
                "sparse / each dense-masked configuration (paired) | peak memory sparse / best | commit |",
                "|---|---|---|---:|---:|---:|---|", *rows]
    if fits:
        out += ([""] if rows else []) + [
            "| result | memory fit | budget | sparse: largest batch | dense-masked: largest batch | dense: largest batch | commit |",
            "|---|---|---:|---:|---:|---:|---|", *fits]
    return "\n".join(out) + "\n"


def render_kernels(paths: list[str]) -> str:
    return "\n".join(f"From `{p}`: " + _load(p)["markdown"].strip() + "\n" for p in paths)


def _minutes(s) -> str:
    return "-" if s is None else f"{s / 60:.1f} min"


def render_image_build(paths: list[str]) -> str:
    lines = ["| result | MinkowskiEngine wheel cache | layer cache | `TORCH_CUDA_ARCH_LIST` | build time | "
             "of which ME compile | image size | smoke test | CPUs | commit |",
             "|---|---|---|---|---:|---:|---:|---|---:|---|"]
    for p in paths:
        r = _load(p)
        smoke = {True: "passed", False: "**failed**", None: "not run"}[r.get("smoke_ok")]
        if r.get("smoke_ok") is False:  # name the step it stopped in
            reached = [ln[3:].split(":")[0] for ln in r["smoke"] if ln.startswith("== ") and ln[3:4].isdigit()]
            smoke += f" in step {reached[-1]}" if reached else ""
        lines.append(
            f"| `{pathlib.Path(p).name}` | {r['me_wheel_cache'].replace('layer', 'not needed (layer cached)')} | {r['layer_cache']} | "
            f"`{r['build_args']['TORCH_CUDA_ARCH_LIST']}` | {_minutes(r['build_s'])} | {_minutes(r['me_compile_s'])} | "
            f"{r['image_size']} | {smoke} | {r['cpus']} | {r['commit'][:7]} |")
    return "\n".join(lines) + "\n"


def _console(lines: list[str]) -> list[str]:
    """What a terminal shows at the end: the last redraw of each carriage-return line, no progress bars."""
    shown = [ln.split("\r")[-1].rstrip() for ln in lines]
    bar = [bool(re.match(r"^\w+: +\d+%\|", ln)) for ln in shown]

    def near_bar(i: int) -> bool:  # blank lines a progress bar leaves around itself
        for step in (-1, 1):
            j = i + step
            while 0 <= j < len(shown) and not shown[j]:
                j += step
            if 0 <= j < len(shown) and bar[j]:
                return True
        return False

    cleared = [bool(ln) and not ln.strip() for ln in lines]  # a bar erased with spaces
    return [ln for i, ln in enumerate(shown) if not bar[i] and not cleared[i] and not (not ln and near_bar(i))]


def render_image_smoke(paths: list[str]) -> str:
    out = []
    for p in paths:
        r = _load(p)
        r["smoke"] = _console(r["smoke"])
        out.append(f"From `{p}` ({r['builder']}, storage driver {r['storage_driver']}), the build log's last lines:\n"
                   "```\n" + "\n".join(r["build_log_tail"]) + "\n```\nThe smoke test (`scripts/smoke_image.sh`):\n"
                   "```\n" + "\n".join(r["smoke"]).strip("\n") + "\n```\n")
    return "\n".join(out)


def _sparse_train_rate(res: dict) -> float:
    """The sparse training step's images/s at mask 0.6 in a bench result (the headline's number)."""
    rows = [r for r in res["results"] if r["mode"] == "train" and abs(r["mask_ratio"] - 0.6) < 1e-9]
    return rows[0]["variants"]["sparse"]["images_per_s"]


def render_data_cores(paths: list[str]) -> str:
    """How many decode cores one GPU needs: a ``bench-data`` result (its one-worker rows: one core each) against
    the sparse training throughput of the GPU bench results that follow it."""
    data, gpus = _load(paths[0]), paths[1:]
    one = {r["source"]: r for r in data["results"] if r["workers"] == 1}
    m, s = data["machine"], data["settings"]
    lines = [f"One loader worker (one core of an {m['cpu_model']}, load average {m['load_average_start'][0]} while measured) "
             f"feeds {s['img_size']} px images at **{one['imagefolder']['images_per_s_per_worker']:.0f} img/s** from an "
             f"image folder and **{one['webdataset']['images_per_s_per_worker']:.0f} img/s** from shards "
             f"(`{paths[0]}`, commit {m['git_commit'][:7]}). The sparse training step of one GPU then needs:", "",
             "| GPU result | precision | sparse img/s | decode cores (image folder) | decode cores (shards) |",
             "|---|---|---:|---:|---:|"]
    for p in gpus:
        res = _load(p)
        rate = _sparse_train_rate(res)
        dtype = "bf16 autocast" if res["settings"]["dtype"].startswith("bfloat16") else "fp32"
        cores = [math.ceil(rate / one[src]["images_per_s_per_worker"]) for src in ("imagefolder", "webdataset")]
        lines.append(f"| `{pathlib.Path(p).name}` ({res['machine']['gpu']}) | {dtype} | {rate:.0f} | {cores[0]} | {cores[1]} |")
    return "\n".join(lines) + "\n"


def render_data_cores_line(paths: list[str]) -> str:
    """One sentence for the README: the decode cores per GPU at the first GPU result's sparse throughput."""
    data, res = _load(paths[0]), _load(paths[1])
    per = {r["source"]: r["images_per_s_per_worker"] for r in data["results"] if r["workers"] == 1}
    rate = _sparse_train_rate(res)
    return (f"the sparse step's {rate:.0f} img/s on one {res['machine']['gpu']} need about "
            f"**{math.ceil(rate / per['imagefolder'])} decode cores** per GPU from an image folder "
            f"({math.ceil(rate / per['webdataset'])} from shards) at {per['imagefolder']:.0f} / {per['webdataset']:.0f} "
            f"img/s per core, measured on one {data['machine']['cpu_model']} core (`{pathlib.Path(paths[0]).name}`).\n")


RENDERERS = {
    "data-cores": render_data_cores,
    "data-cores-line": render_data_cores_line,
    "bench": render_bench,
    "bench-lead": lambda paths: render_bench(paths, lead_only=True),
    "headline": render_headline,
    "volume-headline": render_volume_headline,
    "kernels": render_kernels,
    "image-build": render_image_build,
    "image-smoke": render_image_smoke,
}


def render(text: str, where: str) -> str:
    def one(m: re.Match) -> str:
        kind, paths = m.group(2), m.group(3).split()
        if kind not in RENDERERS:
            raise SystemExit(f"error: {where}: unknown render kind {kind!r}")
        return m.group(1) + RENDERERS[kind](paths) + m.group(5)

    return BLOCK.sub(one, text)


def docs() -> list[pathlib.Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a rendered block is stale")
    a = ap.parse_args(argv)
    stale = []
    for path in docs():
        text = path.read_text()
        new = render(text, str(path.relative_to(ROOT)))
        if new != text:
            stale.append(str(path.relative_to(ROOT)))
            if not a.check:
                path.write_text(new)
    if a.check and stale:
        print(f"error: stale rendered blocks in {', '.join(stale)}: run python benchmarks/render_docs.py", file=sys.stderr)
        return 1
    print(("stale: " if a.check else "rendered: ") + (", ".join(stale) or "nothing to change"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
