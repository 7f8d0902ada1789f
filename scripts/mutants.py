"""Deliberate bugs, one at a time: does the test suite catch each? (``make mutants``; not in CI: minutes.)

Each mutant replaces one piece of source text, runs the tests that should catch it, and puts the file back
(also on failure or Ctrl-C). Mutants in csrc/ rebuild the extension before and after. The result, with the
commit it measured, goes to benchmarks/results/mutants.json; every mutant must be caught.

    python scripts/mutants.py [--only ID,ID] [--out PATH]
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

# (id, what the bug is, file, original text, mutated text, tests that should catch it)
MUTANTS = [
    ("missing-accum-division", "the loss is not divided by the accumulation steps",
     "sparse_fcmae/training/engine.py", "scaler.scale(loss / accum).backward()", "scaler.scale(loss).backward()",
     "tests/test_launch.py -k two_process"),
    ("training-step-leaks-its-graph", "every step's loss is kept with its graph (memory grows step after step)",
     "sparse_fcmae/training/engine.py", "scaler.scale(loss / accum).backward()",
     "scaler.scale(loss / accum).backward(retain_graph=True); model.__dict__.setdefault('_kept', []).append(loss)",
     "tests/test_memory.py"),
    ("sum-not-mean-across-processes", "the logged loss sums the processes instead of averaging them",
     "sparse_fcmae/training/engine.py", "global_loss = stats[0].item() / denv.world_size",
     "global_loss = stats[0].item()", "tests/test_launch.py -k two_process"),
    ("batch-pooled-grn", "GRN pools its norms over the whole batch (the official MinkowskiGRN's bug)",
     "sparse_fcmae/sparse/neighbors.py", "seg = (batch, num_samples, batch_segments(batch, num_samples))",
     "seg = (batch * 0, num_samples, batch_segments(batch * 0, num_samples))",
     "tests/test_equivalence.py tests/test_fcmae.py"),
    ("transposed-mask-layout", "the patch mask is read column-major",
     "sparse_fcmae/masking.py", "    m = mask.reshape(-1, *grid)\n", "    m = mask.reshape(-1, *grid).transpose(1, 2)\n",
     "tests/test_mask_isolation.py tests/test_equivalence.py"),
    ("masked-pixels-reach-the-encoder", "the sparse tensor is built from every site, masked ones too",
     "sparse_fcmae/models/convnextv2.py", "s = to_sparse(x, upsample_mask(mask, grid, PATCH_SIZE // STEM_STRIDE))",
     "s = to_sparse(x, upsample_mask(mask * 0, grid, PATCH_SIZE // STEM_STRIDE))",
     "tests/test_mask_isolation.py"),
    ("kernel-silent-fallback", "the compiled kernels are never used (silent fallback to the reference)",
     "sparse_fcmae/ops/backend.py", "ext = None if forced_off else _load()", "ext = None",
     "tests/test_kernels.py"),
    ("per-batch-drop-path", "drop path draws one keep/drop for the whole batch",
     "sparse_fcmae/models/convnextv2.py", "y = y * (keep / (1.0 - p))[stage.batch]", "y = y * (keep / (1.0 - p))[0]",
     "tests/test_equivalence.py -k drop"),
    ("neighbour-table-off-by-one", "the neighbour table is shifted by one row",
     "sparse_fcmae/sparse/neighbors.py", "shift = pad - r  #", "shift = pad - r + 1  #",
     "tests/test_neighbors.py"),
    ("strided-rows-in-hash-order", "the strided stages take ME's hash-ordered map (the kernels' gathers lose locality)",
     "sparse_fcmae/sparse/neighbors.py", 'out_key, _ = manager.insert_and_map(coords, out_stride, "raster")',
     "out_key = manager.stride(x.coordinate_map_key, [stride] * x.D)", "tests/test_neighbors.py"),
    ("model-imports-training", "a model module imports the training package above it (the layering breaks)",
     "sparse_fcmae/models/fcmae.py", "from ..masking import", "from ..training import state  # noqa: F401\nfrom ..masking import",
     "tests/test_layout.py"),
    ("grn-eps-inside-the-mean", "GRN adds eps before averaging the norms, not after (CPU and CUDA kernels)",
     "csrc/grn_algebra.h", "return sum_g / A(C) + A(eps);", "return (sum_g + A(eps)) / A(C);",
     "tests/test_kernels.py tests/test_ops.py"),
    # volumes (spatial_dims=3; issue 15)
    ("transposed-3d-mask", "the 3D patch mask is read with depth and height swapped",
     "sparse_fcmae/masking.py", "    m = mask.reshape(-1, *grid)\n", "    m = mask.reshape(-1, *grid).transpose(1, 2)\n",
     "tests/test_volumes.py"),
    ("batch-pooled-grn-3d", "GRN pools its norms over the whole batch, volumes",
     "sparse_fcmae/sparse/neighbors.py", "seg = (batch, num_samples, batch_segments(batch, num_samples))",
     "seg = (batch * 0, num_samples, batch_segments(batch * 0, num_samples))",
     "tests/test_volumes.py"),
    ("3d-kernel-offsets-last-axis-fastest", "kernel offsets enumerated with the last spatial axis fastest (not ME's order)",
     "sparse_fcmae/ops/kernel_layout.py", "i.repeat_interleave(kernel_size ** a).repeat(kernel_size ** (spatial_dims - 1 - a))",
     "i.repeat_interleave(kernel_size ** (spatial_dims - 1 - a)).repeat(kernel_size ** a)",
     "tests/test_volumes_kernels.py tests/test_volumes.py"),
    ("3d-patchify-voxel-order", "patchify lists a patch's voxels in reversed axis order",
     "sparse_fcmae/models/fcmae.py", "*range(3, 3 + 2 * d, 2), 1)", "*reversed(range(3, 3 + 2 * d, 2)), 1)",
     "tests/test_volumes.py"),
    ("dense-masked-grn-over-two-axes", "the dense-masked GRN norms over two spatial axes only (the 2D hardcode)",
     "sparse_fcmae/models/dense_masked.py", "g = torch.linalg.vector_norm(x * m, ord=2, dim=tuple(range(1, x.ndim - 1)), keepdim=True)",
     "g = torch.linalg.vector_norm(x * m, ord=2, dim=(1, 2), keepdim=True)",
     "tests/test_volumes.py"),
    ("dense3d-depthwise-axes-swapped", "convert --to dense3d lays the depthwise kernel out with depth and width swapped",
     "sparse_fcmae/convert/dense3d.py", 'depthwise_kernel_to_weight(enc[p + "dwconv.kernel"], 3).contiguous()',
     'depthwise_kernel_to_weight(enc[p + "dwconv.kernel"], 3).transpose(2, 4).contiguous()',
     "tests/test_volumes_convert.py"),
    # data=volumes (issue 15 item 4)
    ("volume-crop-not-seeded", "3D training crops drawn from the OS's entropy, not the per-sample seed",
     "sparse_fcmae/data/volumes.py", "int(torch.randint(0, n - s + 1, ()))", "__import__('random').SystemRandom().randint(0, n - s)",
     "tests/test_volumes_data.py -k 'crops or sigkill'"),
    ("volume-eval-crop-random", "evaluation volumes cropped at random, not centred",
     "sparse_fcmae/data/volumes.py", "if self.train else (n - s) // 2", "if True else (n - s) // 2",
     "tests/test_volumes_data.py -k crops"),
    ("nifti-channels-reshaped", "a 4D volume's channels moved first by a reshape instead of a transpose",
     "sparse_fcmae/data/volumes.py", "arr = np.moveaxis(arr, -1, 0)", "arr = arr.reshape(arr.shape[-1], *arr.shape[:-1])",
     "tests/test_volumes_data.py -k nifti_and_npy"),
    ("zscore-pooled-over-channels", "volume z-scoring pools every channel instead of normalising each",
     "sparse_fcmae/data/volumes.py", "(vol - flat.mean(1).view(c, 1, 1, 1)) / flat.std(1).clamp_min(1e-6).view(c, 1, 1, 1)",
     "(vol - flat.mean()) / flat.std().clamp_min(1e-6)", "tests/test_volumes_data.py -k intensity"),
    ("skipped-file-not-counted", "a corrupt file is replaced by the next one but not counted",
     "sparse_fcmae/data/folders.py", "return self.transform(item), label, int(k > 0)", "return self.transform(item), label, 0",
     "tests/test_volumes_data.py -k corrupt"),
    # bench --spatial-dims 3 and its memory fit; fine-tuning on volumes (issue 15 items 6 and 3)
    ("fit-bisection-stops-early", "the memory fit's bisection stops with a gap of 2 (the largest batch can be missed)",
     "sparse_fcmae/bench/fit.py", "while bad is not None and bad - good > 1:", "while bad is not None and bad - good > 2:",
     "tests/test_bench_volumes.py -k largest"),
    ("fit-ignores-the-budget", "a batch 'fits' whenever its step ran, whatever its peak memory",
     "sparse_fcmae/bench/fit.py", "fits = w.error is None and peak is not None and peak <= budget_mb",
     "fits = w.error is None and peak is not None", "tests/test_bench_volumes.py -k fit_only"),
    ("3d-flops-2d-downsampling", "the 3D FLOP formula counts 2x2 (not 2x2x2) downsampling taps",
     "sparse_fcmae/bench/variants.py", "stages += 2 ** d * dims[i - 1] * c * res ** d", "stages += 4 * dims[i - 1] * c * res ** d",
     "tests/test_bench_volumes.py -k flop"),
    ("volume-finetune-ignores-weights", "fine-tuning on volumes starts from random weights whatever weights= says",
     "sparse_fcmae/finetune/volumes.py", "    if not cfg.weights:\n        return model\n    state, size",
     "    if True:\n        return model\n    state, size", "tests/test_finetune_volumes.py -k explicit_mapping"),
    ("volume-linprobe-on-logits", "the 3D head ignores pre_logits (linear probing would train on logits)",
     "sparse_fcmae/models/convnext3d.py", "return x if pre_logits else self.fc(x)", "return self.fc(x)",
     "tests/test_finetune_volumes.py -k cli"),
    ("resume-skips-a-step", "a resumed run skips one micro-batch",
     "sparse_fcmae/training/state.py", 'prog = Progress(**ckpt["progress"]) if "progress" in ckpt else',
     'prog = Progress(**{**ckpt["progress"], "micro": ckpt["progress"]["micro"] + 1}) if "progress" in ckpt else',
     "tests/test_faults.py -k 'sigkill or sigterm'"),
    # data=webdataset and bench-data (issue 12)
    ("wds-resume-without-stream-rotation", "a resumed loader's worker w plays stream w, not (w + micro-batches done) mod workers",
     "sparse_fcmae/data/shards.py", "stream = (worker + self.start) % self.streams", "stream = worker % self.streams",
     "tests/test_webdataset.py -k 'killed or disjoint'"),
    ("wds-resume-skips-nothing", "a resumed stream starts again at its first sample",
     "sparse_fcmae/data/shards.py", "done = _batches_of_stream(self.start, stream, self.streams) * self.batch_size",
     "done = 0", "tests/test_webdataset.py -k 'killed or disjoint'"),
    ("wds-shards-not-split-across-processes", "every process reads every shard (only workers split them)",
     "sparse_fcmae/data/shards.py", "order[self.rank::self.world_size][stream::self.streams]", "order[stream::self.streams]",
     "tests/test_webdataset.py -k disjoint"),
    ("wds-same-shard-order-every-epoch", "the shard order ignores the epoch",
     "sparse_fcmae/data/shards.py", "default_rng([self.seed, self.epoch, cycle])", "default_rng([self.seed, cycle])",
     "tests/test_webdataset.py -k disjoint"),
    ("wds-unseeded-shuffle", "the shuffle buffer draws from an unseeded RNG",
     "sparse_fcmae/data/shards.py", 'rng = random.Random(f"shuffle-{self.seed}-{self.epoch}-{self.rank}-{stream}")',
     "rng = random.Random()", "tests/test_webdataset.py -k 'corrupt or disjoint'"),
    ("wds-corrupt-not-counted", "a corrupt sample is replaced but not counted",
     "sparse_fcmae/data/shards.py", "yield out, int(p != pos)", "yield out, 0", "tests/test_webdataset.py -k corrupt"),
    ("wds-epoch-size-ignored", "data.epoch_size is ignored: the epoch is always the counted samples",
     "sparse_fcmae/data/shards.py", "self.num_images = epoch_size if epoch_size is not None else count_samples(self.urls)",
     "self.num_images = count_samples(self.urls)", "tests/test_webdataset.py -k list_of_urls"),
    ("wds-npy-layout-ignored", "shard members ignore data.npy_layout (always read as H x W x C)",
     "sparse_fcmae/data/shards.py", "self.in_chans, self.npy_layout, data=sample[key])", 'self.in_chans, "hwc", data=sample[key])',
     "tests/test_webdataset.py -k members"),
    ("bench-data-counts-batches", "bench-data counts batches, not images",
     "sparse_fcmae/bench/data_pipeline.py", "images += imgs.shape[0]", "images += 1", "tests/test_bench_data.py"),
    # finetune / linprobe preemption and resume (issue 12)
    ("ft-resume-skips-a-step", "a resumed fine-tuning run skips one step of the interrupted epoch",
     "sparse_fcmae/finetune/state.py", '    history = list(ckpt.get("history", []))[: prog.epoch]',
     '    prog.micro += prog.micro > 0\n    history = list(ckpt.get("history", []))[: prog.epoch]',
     "tests/test_finetune_resume.py -k sigterm"),
    ("ft-resume-replays-the-epoch-start", "a resumed epoch reads its first batches again instead of the ones it had left",
     "sparse_fcmae/finetune/data.py", "set_epoch(epoch, start=micro * bs)", "set_epoch(epoch, start=0)",
     "tests/test_finetune_resume.py -k sigterm"),
    ("ft-optimizer-state-not-saved", "the fine-tuning checkpoint keeps AdamW's groups but not its moments",
     "sparse_fcmae/finetune/state.py", "    state.update(history=list(history),",
     '    state.update(optimizer={"state": {}, "param_groups": state["optimizer"]["param_groups"]}, history=list(history),',
     "tests/test_finetune_resume.py -k sigterm"),
    ("ft-ema-not-restored", "a resumed run restarts its EMA from the current weights",
     "sparse_fcmae/finetune/state.py",
     'ema.module.load_state_dict(ckpt["model_ema"] if "model_ema" in ckpt else model.state_dict())',
     "ema.module.load_state_dict(model.state_dict())", "tests/test_finetune_resume.py -k sigterm"),
    ("ft-rng-not-saved", "the fine-tuning checkpoint holds no RNG state (Mixup's numpy draws, drop path's torch draws)",
     "sparse_fcmae/finetune/state.py", "[rng_state(next(model.parameters()).device)]", "[]", "tests/test_finetune_resume.py -k sigterm"),
    ("ft-loader-draws-global-rng", "fine-tuning loaders draw their worker seed from the global torch RNG",
     "sparse_fcmae/finetune/data.py", "generator=torch.Generator(), **kw)", "**kw)", "tests/test_finetune_resume.py -k sigterm"),
    ("ft-signal-ignored", "fine-tuning never looks at the stop request (SIGTERM is caught, training goes on)",
     "sparse_fcmae/finetune/loop.py", "if stop is not None and stop.signum:", "if False:", "tests/test_finetune_resume.py -k sigterm"),
    ("ft-requeue-ignored", "requeue=true is not passed on: no scontrol requeue",
     "sparse_fcmae/finetune/run.py", "last, cfg.requeue)", "last, False)", "tests/test_finetune_resume.py -k requeue"),
    ("ft-run-dir-not-locked", "a new fine-tuning run folder is never locked",
     "sparse_fcmae/finetune/run.py", "lock = lock or lock_run_dir(run_dir, cfg.mode)", "lock = lock",
     "tests/test_finetune_resume.py -k one_finetune"),
    ("ft-defaults-from-the-wrong-yaml", "linprobe takes its missing keys from conf/finetune.yaml",
     "sparse_fcmae/finetune/run.py", 'cfg = with_defaults(cfg, cfg.mode if cfg.get("mode") in ("finetune", "linprobe") else "finetune")',
     'cfg = with_defaults(cfg, "finetune")', "tests/test_finetune_resume.py -k partial_config"),
    ("ft-imports-minkowski", "importing fine-tuning pulls in the sparse model (MinkowskiEngine)",
     "sparse_fcmae/training/__init__.py", "from .schedule import lr_at, param_groups",
     "from .pretrain import build_model  # noqa: F401\nfrom .schedule import lr_at, param_groups", "tests/test_finetune_resume.py -k minkowski"),
    # finetune / linprobe on WebDataset shards (issue 12)
    ("wdsft-labels-ignored", "fine-tuning on shards trains and scores every sample as class 0 (its .cls unread)",
     "sparse_fcmae/data/shards.py", "yield (out, label, int(p != pos)) if self.labels", "yield (out, 0, int(p != pos)) if self.labels",
     "tests/test_finetune_webdataset.py -k score"),
    ("wdsft-label-range-unchecked", "a .cls label outside 0..data.num_classes-1 is taken as it is",
     "sparse_fcmae/data/shards.py", "if not 0 <= y < self.num_classes:", "if False:",
     "tests/test_finetune_webdataset.py -k bad_label"),
    ("wdsft-val-shards-read-by-every-worker", "each loader worker reads every validation shard (samples scored twice)",
     "sparse_fcmae/data/shards.py", "for i in range(worker, len(self.urls), workers):", "for i in range(len(self.urls)):",
     "tests/test_finetune_webdataset.py -k score"),
    ("wdsft-corrupt-val-sample-scored", "a corrupt validation sample's placeholder is scored",
     "sparse_fcmae/finetune/data.py", "keep = y >= 0", "keep = y >= -1", "tests/test_finetune_webdataset.py -k score"),
    ("wdsft-corrupt-val-sample-not-counted", "a corrupt validation sample is dropped but not counted",
     "sparse_fcmae/data/shards.py", "return (img, -1, 1) if self.labels", "return (img, -1, 0) if self.labels",
     "tests/test_finetune_webdataset.py -k score"),
    ("wdsft-val-with-training-crop", "validation shards get the training transform (random crops), not the centre crop",
     "sparse_fcmae/finetune/data.py", 'urls=d.val_urls, train=False,', 'urls=d.val_urls, train=True,',
     "tests/test_finetune_webdataset.py -k 'score or augmentation'"),
    ("wdsft-resume-at-epoch-start", "a resumed fine-tuning run on shards starts its epoch's streams from the beginning",
     "sparse_fcmae/finetune/data.py", "return loader(dataset, bs, num_workers), steps, dataset.set_epoch",
     "return loader(dataset, bs, num_workers), steps, lambda epoch, micro: dataset.set_epoch(epoch)",
     "tests/test_finetune_webdataset.py -k sigterm"),
    ("wdsft-no-finetune-augmentation", "shard training samples miss the fine-tuning augmentation (RandAugment, erasing)",
     "sparse_fcmae/finetune/data.py", "shuffle_buffer=d.shuffle_buffer,\n                          augment=augment,",
     "shuffle_buffer=d.shuffle_buffer,\n                          augment={},", "tests/test_finetune_webdataset.py -k augmentation"),
    ("wdsft-worker-error-is-a-traceback-line", "an error raised in a loader worker prints \"Caught X in DataLoader worker\"",
     "sparse_fcmae/cli.py", "msg = _worker_message(str(e)) or (", "msg = None or (", "tests/test_finetune_webdataset.py -k bad_label"),
    ("wdsft-scored-count-not-saved", "a finished run started again reports the counted val samples, not the scored ones",
     "sparse_fcmae/finetune/run.py", "val_skipped=val_skipped[0], val_scored=scored[0])",
     "val_skipped=val_skipped[0], val_scored=None)", "tests/test_finetune_webdataset.py -k score"),
    ("run-dir-flock", "the run_dir lock is an flock, shared with forked DataLoader workers that outlive a killed run",
     "sparse_fcmae/training/state.py", "fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)",
     "fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)", "tests/test_finetune_resume.py -k workers"),
]


def _rebuild() -> None:
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_one(mid, what, rel, old, new, tests) -> dict:
    path = ROOT / rel
    original = path.read_text()
    if original.count(old) != 1:
        return {"id": mid, "bug": what, "file": rel, "caught": None, "error": "the original text is not found once"}
    native = rel.startswith("csrc/")
    t0 = time.time()
    try:
        path.write_text(original.replace(old, new))
        if native:
            _rebuild()
        r = subprocess.run(f"{sys.executable} -m pytest -x -q -p no:cacheprovider {tests}", shell=True, cwd=ROOT,
                           capture_output=True, text=True, timeout=1800)
    finally:
        path.write_text(original)
        if native:
            _rebuild()
    tail = [ln for ln in r.stdout.strip().splitlines() if ln.strip()][-1:] or [""]
    return {"id": mid, "bug": what, "file": rel, "tests": tests, "caught": r.returncode != 0,
            "pytest": tail[0], "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated mutant ids")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mutants.json"))
    a = ap.parse_args(argv)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    wanted = set(filter(None, a.only.split(",")))
    rows = []
    for m in MUTANTS:
        if wanted and m[0] not in wanted:
            continue
        rows.append(run_one(*m))
        row = rows[-1]
        print(f"[mutants] {'caught  ' if row['caught'] else 'SURVIVED' if row['caught'] is False else 'ERROR   '} "
              f"{row['id']}: {row.get('pytest') or row.get('error')}", flush=True)
    result = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "git_commit": commit + ("-dirty" if dirty else ""), "mutants": rows,
              "all_caught": all(r["caught"] for r in rows)}
    from sparse_fcmae.checkpoint import atomic_write

    atomic_write(pathlib.Path(a.out), lambda f: f.write((json.dumps(result, indent=1) + "\n").encode()))
    print(f"[mutants] {sum(bool(r['caught']) for r in rows)}/{len(rows)} caught; written {a.out}")
    return 0 if result["all_caught"] else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
