"""``sparse-fcmae bench-data``: images/s of pretraining's data pipeline (decode + RandomResizedCrop + flip +
normalise, the per-sample seeding included) per DataLoader worker count, for an image folder and for WebDataset
shards of the same images, so that a user can size ``data.num_workers`` per GPU.

One pass over the images per (source, workers), timed from the loader's start (worker start-up included) to
its last batch; the main process runs with one torch thread, as DataLoader workers do, so ``workers=0`` is one
core too. Without ``--root`` the images are JPEG crops of scikit-learn's two sample photos, ImageNet-like in
size (256-427 x 256-640 px, quality 90): nothing is downloaded. Shards are written from the folder (webdataset's
``ShardWriter``) unless ``--urls`` names existing ones.
"""
from __future__ import annotations

import datetime
import json
import math
import pathlib
import tempfile
import time

import numpy as np
import torch

SCHEMA_ID = "sparse-fcmae-bench-data/1"


def sample_folder(folder: pathlib.Path, n: int, seed: int = 0) -> pathlib.Path:
    """``n`` JPEG crops of scikit-learn's sample photos in ``folder/photos/`` (an image folder with one class)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two 427 x 640 RGB photos, bundled
    rng = np.random.default_rng(seed)
    cls = folder / "photos"
    cls.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        p = photos[i % len(photos)]
        h, w = int(rng.integers(256, p.shape[0] + 1)), int(rng.integers(256, p.shape[1] + 1))
        y, x = int(rng.integers(0, p.shape[0] - h + 1)), int(rng.integers(0, p.shape[1] - w + 1))
        Image.fromarray(p[y:y + h, x:x + w]).save(cls / f"{i:06d}.jpg", quality=90)
    return folder


def write_shards(files: list[str], folder: pathlib.Path, count: int) -> str:
    """The files as ``count`` shards (bytes as they are, extension kept); returns their brace pattern."""
    import webdataset as wds

    per = math.ceil(len(files) / count)
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / "shard-%06d.tar"), maxcount=per, verbose=0) as w:
        for i, path in enumerate(files):
            w.write({"__key__": f"{i:08d}", pathlib.Path(path).suffix.lower().lstrip("."): pathlib.Path(path).read_bytes()})
    n = len(list(folder.glob("shard-*.tar")))
    return str(folder / f"shard-{{000000..{n - 1:06d}}}.tar")


def _loader(source: str, where: str, workers: int, img_size: int, in_chans: int, batch: int, n: int | None, seed: int):
    from torch.utils.data import DataLoader

    from ..data import ResumableSampler, SeededSamples, build_dataset

    if source == "imagefolder":
        samples = SeededSamples(build_dataset("imagefolder", img_size, in_chans, root=where, seed=seed), seed)
        sampler = ResumableSampler(samples, seed=seed)
        return DataLoader(samples, batch_size=batch, sampler=sampler, num_workers=workers), len(samples)
    stream = build_dataset("webdataset", img_size, in_chans, urls=where, seed=seed, epoch_size=n)  # None: counted
    batches = max(1, stream.num_images // batch)
    stream.plan(batch, batches, 1, 0, max(1, workers))
    return DataLoader(stream, batch_size=batch, num_workers=workers), batches * batch


def measure(source: str, where: str, workers: int, img_size: int, in_chans: int, batch: int, n: int | None,
            seed: int) -> dict:
    """One pass: images delivered, seconds, images/s (all workers) and per worker (``n``: the shards' samples,
    None: counted)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker: workers=0 is one core too
    try:
        loader, expected = _loader(source, where, workers, img_size, in_chans, batch, n, seed)
        t0 = time.perf_counter()
        images = skipped = 0
        t_first = first = None
        for imgs, bad in loader:
            images += imgs.shape[0]
            skipped += int(bad.sum())
            if t_first is None:  # worker start-up is over: the steady rate counts from here
                t_first, first = time.perf_counter(), images
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    steady = (images - first) / (time.perf_counter() - t0 - (t_first - t0)) if images > first else None
    w = max(1, workers)
    return {"source": source, "workers": workers, "images": images, "expected_images": expected, "skipped": skipped,
            "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 1),
            "images_per_s_steady": None if steady is None else round(steady, 1),
            "images_per_s_per_worker": round((steady or images / seconds) / w, 1)}


def run(root: str | None, urls: str | None, workers: list[int], img_size: int, in_chans: int, batch: int,
        sample_images: int, seed: int, note: str | None, progress=print) -> dict:
    from ..data import IMAGE_EXTENSIONS
    from ..machine import load_average, machine_info

    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        tmp = pathlib.Path(tmp)
        made_folder = root is None
        if made_folder:
            root = str(sample_folder(tmp / "folder", sample_images, seed))
        files = sorted(str(p) for p in pathlib.Path(root).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"--root {root}: no images found (expected root/<class>/<image>)")
        made = urls is None
        if made:
            urls = write_shards(files, tmp / "shards", max(8, max(workers)))
        sizes = [pathlib.Path(f).stat().st_size for f in files]
        results = []
        for source, where in (("imagefolder", root), ("webdataset", urls)):
            for w in workers:
                r = measure(source, where, w, img_size, in_chans, batch, len(files) if made else None, seed)
                progress(f"[bench-data] {source}, {w} worker(s): {r['images']} images in {r['seconds']:.1f} s = "
                         f"{r['images_per_s']:.0f} img/s ({r['images_per_s_per_worker']:.0f} per worker)")
                results.append(r)
    machine["load_average_end"] = load_average()
    return {
        "schema": SCHEMA_ID,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "settings": {"img_size": img_size, "in_chans": in_chans, "batch": batch, "workers": workers, "seed": seed,
                     "pipeline": "decode + RandomResizedCrop(0.2-1, bicubic) + flip + normalise, seeded per sample",
                     "per_worker": "the steady rate (after the first batch: worker start-up excluded) / max(1, workers)",
                     "images": len(files), "mean_file_kb": round(sum(sizes) / len(sizes) / 1024, 1),
                     "folder": "scikit-learn sample-photo crops" if made_folder else root, "shards": "written from the folder" if made else urls, "note": note},
        "results": results,
    }


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    lines = [f"# sparse-fcmae bench-data ({result['created']})", "",
             f"CPU: {m['cpu_model']} ({m['cpu_cores']} cores); torch {m['torch']}; commit {m['git_commit'] or 'unknown'}; "
             f"load average {m['load_average_start']} -> {m.get('load_average_end')}.",
             f"{s['images']} images ({s['folder']}, {s['mean_file_kb']} KB per file on average), {s['img_size']} px, "
             f"{s['in_chans']} channels, batch {s['batch']}; {s['pipeline']}; shards {s['shards']}.", ""]
    if s.get("note"):
        lines += [f"Note: {s['note']}", ""]
    lines += ["| source | workers | images | seconds (start-up included) | img/s | img/s after the first batch | "
              "img/s per worker |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["results"]:
        steady = "n/a" if r["images_per_s_steady"] is None else f"{r['images_per_s_steady']:.0f}"
        lines.append(f"| {r['source']} | {r['workers']} | {r['images']} | {r['seconds']:.2f} | {r['images_per_s']:.0f} | "
                     f"{steady} | {r['images_per_s_per_worker']:.0f} |")
    return "\n".join(lines) + "\n"


def main(args) -> dict[str, pathlib.Path]:
    from ..checkpoint import atomic_write

    try:
        workers = [int(w) for w in str(args.workers).split(",")]
    except ValueError:
        raise ValueError(f"--workers must be comma-separated integers, got {args.workers!r}") from None
    if not workers or min(workers) < 0:
        raise ValueError(f"--workers must be integers >= 0, got {args.workers!r}")
    if args.img_size < 32 or args.img_size % 32:
        raise ValueError(f"--img-size must be divisible by 32, got {args.img_size}")
    if min(args.batch, args.sample_images, args.in_chans) < 1:
        raise ValueError("--batch, --sample-images and --in-chans must be >= 1")
    if pathlib.Path(args.label).name != args.label or args.label in ("", ".", ".."):
        raise ValueError(f"--label must be a plain file name stem, got {args.label!r}")
    if args.root is not None and not pathlib.Path(args.root).is_dir():
        raise FileNotFoundError(f"--root {args.root}: folder not found")
    if args.urls is not None:
        from ..data.shards import shard_urls

        shard_urls(args.urls)  # missing shards: refused before anything is measured
    out = pathlib.Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    result = run(args.root, args.urls, workers, args.img_size, args.in_chans, args.batch, args.sample_images, args.seed,
                 args.note)
    paths = {"json": out / f"{args.label}.json", "md": out / f"{args.label}.md"}
    atomic_write(paths["json"], lambda f: f.write((json.dumps(result, indent=1) + "\n").encode()))
    atomic_write(paths["md"], lambda f: f.write(markdown(result).encode()))
    return paths
