"""Where a training step's time goes, sparse vs dense-masked FCMAE: the numbers behind the GPU gap.

For each variant, on the same weights and masks as ``sparse-fcmae bench``:
- the step's wall time (median, no extra synchronisation) and the GPU's busy time in it (sum of the
  device kernels' time from torch.profiler): wall >> busy means the step waits on the host (Python,
  dispatch, kernel launches, synchronising calls), not on the GPU;
- the host's time and the device's time under labels for the sparse bookkeeping (``to_sparse``,
  neighbour tables, child tables, sample segments, ``densify``) and the top ops by host and device time;
- phase times (encoder forward, decoder + loss, backward, optimizer step; synchronised between phases);
- step time against batch size, which separates a fixed per-step cost from the per-image one.
Writes a text report and a JSON file.

  python benchmarks/gpu_profile.py --out $OUT/gpu_profile.txt        # also writes gpu_profile.json
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

from sparse_fcmae import bench  # noqa: E402
from sparse_fcmae.checkpoint import atomic_write  # noqa: E402
from sparse_fcmae.masking import random_patch_mask  # noqa: E402
from sparse_fcmae.optim import adamw  # noqa: E402

# where the encoder looks them up: the stages' tables and segments in models.convnextv2 (StageRows), the
# downsampling's child table in sparse.layers
LABELLED = [("sparse_fcmae.models.convnextv2", "neighbor_table"), ("sparse_fcmae.sparse.layers", "child_table"),
            ("sparse_fcmae.models.convnextv2", "sample_segments"), ("sparse_fcmae.models.convnextv2", "to_sparse"),
            ("sparse_fcmae.models.convnextv2", "densify")]


def label_functions() -> None:
    """Wrap the sparse bookkeeping functions (where the layers look them up) in profiler labels."""
    import importlib

    for module_name, fn_name in LABELLED:
        module = importlib.import_module(module_name)
        fn = getattr(module, fn_name)

        def wrapped(*a, __fn=fn, __name=fn_name, **kw):
            with torch.profiler.record_function(f"sfc::{__name}"):
                return __fn(*a, **kw)

        setattr(module, fn_name, wrapped)


def device_time(evt) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, name):
            return float(getattr(evt, name))
    return 0.0


def total_device_time(evt) -> float:
    for name in ("device_time_total", "cuda_time_total"):
        if hasattr(evt, name):
            return float(getattr(evt, name))
    return 0.0


class Runner:
    def __init__(self, variant: str, size: str, batch: int, img: int, ratio: float, precision: str, dev,
                 sparse_compile: str | None = None):
        opts = bench.BenchOptions(out=".", device=dev.type, sizes=(size,))
        state = bench.build_reference_state(opts, size)
        kw = {"in_chans": 3, "decoder_dim": opts.decoder_dim, "decoder_depth": opts.decoder_depth}
        self.model = bench.build_variant(variant, size, state, kw).to(dev).to(memory_format=torch.channels_last)
        self.compiled = self.model
        if sparse_compile and variant == "sparse":  # the graph path, the whole FCMAE forward compiled
            self.model.encoder.use_graph()
            self.compiled = torch.compile(self.model, mode=None if sparse_compile == "default" else sparse_compile)
        gen = torch.Generator().manual_seed(1)
        self.imgs = torch.randn(batch, 3, img, img, generator=gen).to(dev).contiguous(memory_format=torch.channels_last)
        self.masks = [random_patch_mask(batch, (img // 32, img // 32), ratio, generator=gen).to(dev) for _ in range(4)]
        self.opt = adamw(self.model.parameters(), dev, lr=1.5e-4, weight_decay=0.05)
        self.amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        self.dev, self.i = dev, 0

    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def step(self, phases: dict | None = None):
        mask = self.masks[self.i % len(self.masks)]
        self.i += 1
        mark = (lambda name: self._mark(phases, name)) if phases is not None else (lambda name: None)
        self.opt.zero_grad(set_to_none=True)
        mark(None)
        with self.amp:
            if self.compiled is not self.model:  # one graph: no phases inside it
                loss = self.compiled(self.imgs, mask)[0]
                mark("forward (compiled)")
            else:
                feats = self.model.forward_encoder(self.imgs, mask)
                mark("encoder forward")
                pred = self.model.forward_decoder(feats, mask)
                loss = self.model.forward_loss(self.imgs, pred, mask)
                mark("decoder + loss forward")
        loss.backward()
        mark("backward")
        self.opt.step()
        mark("optimizer step")
        return loss

    def _mark(self, phases, name):
        self.sync()
        now = time.perf_counter()
        if name is not None:
            phases.setdefault(name, []).append((now - self._t) * 1e3)
        self._t = now

    def wall_ms(self, steps: int) -> float:
        times = []
        for _ in range(steps):
            self.sync()
            t = time.perf_counter()
            self.step()
            self.sync()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)


def profile(runner: Runner, steps: int, with_stack: bool = False) -> dict:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if runner.dev.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    runner.sync()
    extra = {}
    if with_stack:  # Python frames are recorded only with the verbose experimental config (torch 2.11-2.14)
        from torch._C._profiler import _ExperimentalConfig

        extra["experimental_config"] = _ExperimentalConfig(verbose=True)
    with torch.profiler.profile(activities=acts, with_stack=with_stack, **extra) as prof:
        for _ in range(steps):
            runner.step()
        runner.sync()
    avgs = prof.key_averages()

    def on_device(e) -> bool:  # the device's own activity (kernels, copies), not an op's or a label's share
        return str(getattr(e, "device_type", "")).endswith("CUDA") and not getattr(e, "is_user_annotation", False)

    busy = sum(device_time(e) for e in avgs if on_device(e)) / steps / 1e3
    launches = sum(e.count for e in avgs if "LaunchKernel" in e.key or "cuLaunch" in e.key) / steps
    labels: dict = {}
    for e in avgs:  # a label appears twice: its host ranges, and (with device work) its span on the GPU
        if not e.key.startswith("sfc::"):
            continue
        entry = labels.setdefault(e.key[5:], {"calls_per_step": 0.0, "host_ms_per_step": 0.0,
                                              "ranges_with_device_work_per_step": 0.0, "device_span_ms_per_step": 0.0})
        if str(getattr(e, "device_type", "")).endswith("CPU"):
            entry["calls_per_step"] += e.count / steps
            entry["host_ms_per_step"] += e.cpu_time_total / steps / 1e3
        else:
            entry["ranges_with_device_work_per_step"] += e.count / steps
            entry["device_span_ms_per_step"] += total_device_time(e) / steps / 1e3
    top_host = sorted(avgs, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    top_dev = sorted((e for e in avgs if on_device(e)), key=device_time, reverse=True)[:15]
    stacks = []
    if with_stack:  # where the host time is spent, by Python call site (top 5 frames)
        by_stack = sorted(prof.key_averages(group_by_stack_n=5), key=lambda e: e.self_cpu_time_total, reverse=True)
        stacks = [{"op": e.key, "self_host_ms_per_step": e.self_cpu_time_total / steps / 1e3,
                   "calls_per_step": e.count / steps, "stack": list(e.stack or [])} for e in by_stack[:25]]
    return {
        "host_stacks": stacks,
        "device_busy_ms_per_step": busy,
        "kernel_launches_per_step": launches,
        "ops_per_step": sum(e.count for e in avgs) / steps,
        "labels": labels,
        "top_host_ops": [{"op": e.key, "calls_per_step": e.count / steps,
                          "self_host_ms_per_step": e.self_cpu_time_total / steps / 1e3} for e in top_host],
        "top_device_ops": [{"op": e.key, "calls_per_step": e.count / steps,
                            "self_device_ms_per_step": device_time(e) / steps / 1e3} for e in top_dev],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="text report; the JSON goes beside it (.json)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--mask-ratio", type=float, default=0.6)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--sweep", default="32,64,128", help="batch sizes for the step-time sweep ('' to skip)")
    ap.add_argument("--with-stack", action="store_true", help="also list the host time by Python call site")
    ap.add_argument("--sparse-compile", nargs="?", const="default", default=None, metavar="MODE",
                    help="the sparse encoder's graph path (SparseConvNeXtV2.use_graph), the FCMAE forward torch.compile'd "
                         "in this mode (reduce-overhead: CUDA graphs)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    label_functions()
    info = bench.machine_info()
    report = {"settings": vars(args), "machine": info, "variants": {}, "sweep": {}}
    lines = [f"# gpu_profile: {args.size}, batch {args.batch}, {args.img_size} px, mask {args.mask_ratio}, "
             f"{args.precision}, training step; {info['gpu'] or info['cpu_model']}, torch {info['torch']}", ""]
    for variant in ("sparse", "dense_masked"):
        r = Runner(variant, args.size, args.batch, args.img_size, args.mask_ratio, args.precision, dev,
                   args.sparse_compile)
        for _ in range(3):
            r.step()
        wall = r.wall_ms(args.steps)
        phases: dict = {}
        for _ in range(args.steps):
            r.step(phases)
        prof = profile(r, args.steps, with_stack=args.with_stack)
        entry = {"wall_ms_per_step": wall, "phases_ms": {k: statistics.median(v) for k, v in phases.items()}, **prof}
        report["variants"][variant] = entry
        lines += [f"## {variant}", f"wall {wall:.1f} ms/step; device busy {prof['device_busy_ms_per_step']:.1f} ms/step "
                  f"({100 * prof['device_busy_ms_per_step'] / wall:.0f}%); {prof['kernel_launches_per_step']:.0f} kernel "
                  f"launches and {prof['ops_per_step']:.0f} profiled ops per step",
                  "phases (synchronised): " + ", ".join(f"{k} {v:.1f} ms" for k, v in entry["phases_ms"].items())]
        for name, v in prof["labels"].items():
            lines.append(f"  {name}: {v['calls_per_step']:.0f} calls, host {v['host_ms_per_step']:.2f} ms; "
                         f"{v['ranges_with_device_work_per_step']:.0f} with device work, spanning "
                         f"{v['device_span_ms_per_step']:.2f} ms of the GPU's timeline, per step")
        lines.append("top ops by host time (self, ms/step): " + "; ".join(
            f"{o['op']} {o['self_host_ms_per_step']:.2f} ({o['calls_per_step']:.0f})" for o in prof["top_host_ops"]))
        lines.append("top kernels by device time (ms/step): " + "; ".join(
            f"{o['op'][:60]} {o['self_device_ms_per_step']:.2f} ({o['calls_per_step']:.0f})" for o in prof["top_device_ops"]))
        for st in prof["host_stacks"]:
            lines.append(f"  host {st['self_host_ms_per_step']:.2f} ms ({st['calls_per_step']:.0f}) {st['op']} <- "
                         + " <- ".join(st["stack"][:5]))
        lines.append("")
        del r
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    sweep = [int(b) for b in args.sweep.split(",") if b.strip()]
    if sweep:
        lines.append(f"## step time (ms) against batch size, mask {args.mask_ratio:.2f}")
        for b in sweep:
            row = {}
            for variant in ("sparse", "dense_masked"):
                r = Runner(variant, args.size, b, args.img_size, args.mask_ratio, args.precision, dev,
                           args.sparse_compile)
                for _ in range(2):
                    r.step()
                row[variant] = r.wall_ms(args.steps)
                del r
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            report["sweep"][b] = row
            lines.append(f"batch {b}: sparse {row['sparse']:.1f}, dense-masked {row['dense_masked']:.1f}, "
                         f"speedup {row['dense_masked'] / row['sparse']:.2f}x")
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write(args.out, lambda f: f.write(text.encode()))
    atomic_write(os.path.splitext(args.out)[0] + ".json", lambda f: f.write(json.dumps(report, indent=2).encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
