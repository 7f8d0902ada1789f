"""Sparse vs dense-masked vs dense FCMAE benchmark: throughput, peak memory and the FLOP limit.

``sparse-fcmae bench [options] --out DIR`` measures, in one run, on the same weights, images and masks:

* ``sparse``: ``FCMAE(encoder='sparse')`` (MinkowskiEngine; ``sparse_fcmae.ops`` kernels);
* ``dense_masked``: ``FCMAE(encoder='dense_masked')``, the same parameters run densely with the mask
  re-applied after every spatial op (as SparK and the official JAX code do);
* ``dense``: timm ``convnextv2_<size>`` (weights mapped by ``convert.sparse_to_timm``) on the *whole*
  image, no masking, under the *same* FCMAE decoder and masked loss. The encoder is therefore the
  cost of an ordinary dense ConvNeXt V2; the decoder and loss are identical for all three variants.

Modes: ``forward`` (whole FCMAE forward incl. decoder and loss, ``torch.no_grad``, ``eval()``) and
``train`` (zero_grad, forward, backward, AdamW step). Images/s = batch / median step time over
``steps`` timed steps after ``warmup`` untimed ones.

Method (why it is fair):

* Each variant lives in its own worker process; the main process drives them in lock step, one
  step at a time, rotating the variant order every step, so load drift hits all variants alike.
  Workers never run concurrently.
* On CPU every variant uses channels_last (the dense baselines' fastest layout: about 2x faster
  depthwise conv than NCHW here), also for the shared decoder; fp32 everywhere.
* Peak memory, per configuration: on CUDA ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``; on CPU the process's peak RSS (``VmHWM``) after ``malloc_trim`` and a
  reset of the high-water mark (``/proc/self/clear_refs``, value 5). In both cases the number is the
  peak minus the worker's baseline before the model was built, so it holds weights, gradients,
  optimizer state and activations, not the Python/torch libraries. Forward configurations run before
  training ones so they hold no gradients or optimizer state. If the high-water mark cannot be reset,
  the CPU number is the running maximum (``memory_method`` says so).
* FLOP limit (``count_flops``): conv/linear FLOPs (2 x multiply-adds) of the dense model, encoder +
  decoder, forward or forward + backward for ``train``, and of the encoder's stages alone, by formula
  (the forward count is checked against ``torch.utils.flop_counter.FlopCounterMode`` in the tests).
  The sparse encoder runs the stem densely and the stages on the visible fraction ``v`` of the sites,
  so the ideal sparse cost is ``total - (1 - v) * stages``; ``limit_speedup`` = total / ideal is the
  sparse/dense-masked throughput ratio at equal work per FLOP (elementwise ops, normalisation, GRN and
  the optimizer are not counted, so a variant that wastes more of them can beat it).

JSON schema (``RESULT_SCHEMA`` below, JSON-Schema subset; ``validate`` checks it)::

    schema: "sparse-fcmae-bench/1"
    created: ISO time (UTC)
    machine: platform, python, cpu_model, cpu_cores, torch_threads, gpu (name or null), torch, cuda (or null),
             timm, minkowskiengine (or null), git_commit (or null), ops (implementation of each op),
             load_average_start / load_average_end ([1, 5, 15 min] or null)
    settings: device, sizes, batches, img_sizes, mask_ratios, modes, variants, warmup, steps, seed, in_chans,
              decoder_dim, decoder_depth, channels_last, dtype, memory_method, note,
              and, optional, time_budget_s (or null), stopped_early (true when the time budget cut the run short)
    variants: {name: {available: bool, reason: str or null, description: str}}
    results: list of rows, one per (mode, size, batch, img_size, mask_ratio):
        mode, size, batch, img_size, mask_ratio, visible_fraction,
        flops: {dense_gflops, stages_gflops, sparse_ideal_gflops, limit_speedup},
        variants: {name: {images_per_s, median_s, step_times_s [..], peak_mem_mb, error}}
                  (numbers null and error a string when the variant could not run),
        ratios: {sparse_vs_dense_masked_throughput, sparse_vs_dense_masked_memory,
                 sparse_vs_dense_throughput, dense_masked_vs_dense_throughput} (ratios of the medians) and
                 sparse_vs_dense_masked_throughput_paired, sparse_vs_dense_throughput_paired (median over
                 rounds of the within-round time ratio; steadier under load); null when not measurable
    targets: list of {mode, size, batch, img_size, mask_ratio, throughput_ratio, memory_ratio,
                      throughput_target, memory_target, met (bool or null)}
"""
from __future__ import annotations

import ctypes
import datetime as _dt
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

SCHEMA_ID = "sparse-fcmae-bench/1"
VARIANTS = ("sparse", "dense_masked", "dense")
MODES = ("forward", "train")
DEFAULT_MASK_RATIOS = (0.0, 0.3, 0.5, 0.6, 0.75, 0.9)
VARIANT_DESCRIPTIONS = {
    "sparse": "FCMAE, sparse MinkowskiEngine encoder on the visible sites",
    "dense_masked": "FCMAE, dense encoder with the mask re-applied after every spatial op",
    "dense": "timm convnextv2 encoder on the whole image (no masking) + the same FCMAE decoder and loss",
}
# Issue 6: training step, mask 0.6, 224 px, sparse >= 2x dense-masked throughput, <= 0.5x peak memory
# (CPU: atto batch 8; GPU: tiny batch 64). Reported, never asserted.
TARGETS = {"cpu": ("atto", 8), "cuda": ("tiny", 64)}
TARGET_THROUGHPUT, TARGET_MEMORY = 2.0, 0.5


# ------------------------------------------------------------------------------------------------
# Schema (a JSON-Schema subset: type, properties, required, items, additionalProperties, enum)
# ------------------------------------------------------------------------------------------------
_NUM = {"type": ["number", "null"]}
_STR = {"type": ["string", "null"]}
_VARIANT_RESULT = {
    "type": "object",
    "required": ["images_per_s", "median_s", "step_times_s", "peak_mem_mb", "error"],
    "properties": {
        "images_per_s": _NUM, "median_s": _NUM, "peak_mem_mb": _NUM, "error": _STR,
        "step_times_s": {"type": "array", "items": {"type": "number"}},
    },
}
RESULT_SCHEMA = {
    "type": "object",
    "required": ["schema", "created", "machine", "settings", "variants", "results", "targets"],
    "properties": {
        "schema": {"type": "string", "enum": [SCHEMA_ID]},
        "created": {"type": "string"},
        "machine": {
            "type": "object",
            "required": ["platform", "python", "cpu_model", "cpu_cores", "torch_threads", "gpu", "torch", "cuda",
                         "timm", "minkowskiengine", "git_commit", "ops", "load_average_start", "load_average_end"],
            "properties": {
                "platform": {"type": "string"}, "python": {"type": "string"}, "cpu_model": _STR,
                "cpu_cores": {"type": "integer"}, "torch_threads": {"type": "integer"}, "gpu": _STR,
                "torch": {"type": "string"}, "cuda": _STR, "timm": {"type": "string"},
                "minkowskiengine": _STR, "git_commit": _STR, "ops": {"type": "object"},
                "load_average_start": {"type": ["array", "null"], "items": {"type": "number"}},
                "load_average_end": {"type": ["array", "null"], "items": {"type": "number"}},
            },
        },
        "settings": {
            "type": "object",
            "required": ["device", "sizes", "batches", "img_sizes", "mask_ratios", "modes", "variants", "warmup",
                         "steps", "seed", "in_chans", "decoder_dim", "decoder_depth", "channels_last", "dtype",
                         "memory_method", "note"],
            "properties": {
                "device": {"type": "string", "enum": ["cpu", "cuda"]},
                "sizes": {"type": "array", "items": {"type": "string"}},
                "batches": {"type": "array", "items": {"type": "integer"}},
                "img_sizes": {"type": "array", "items": {"type": "integer"}},
                "mask_ratios": {"type": "array", "items": {"type": "number"}},
                "modes": {"type": "array", "items": {"type": "string", "enum": list(MODES)}},
                "variants": {"type": "array", "items": {"type": "string", "enum": list(VARIANTS)}},
                "warmup": {"type": "integer"}, "steps": {"type": "integer"}, "seed": {"type": "integer"},
                "in_chans": {"type": "integer"}, "decoder_dim": {"type": "integer"},
                "decoder_depth": {"type": "integer"}, "channels_last": {"type": "boolean"},
                "dtype": {"type": "string"}, "memory_method": {"type": "string"}, "note": _STR,
                "time_budget_s": _NUM, "stopped_early": {"type": "boolean"},
            },
        },
        "variants": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["available", "reason", "description"],
                "properties": {"available": {"type": "boolean"}, "reason": _STR, "description": {"type": "string"}},
            },
        },
        "results": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["mode", "size", "batch", "img_size", "mask_ratio", "visible_fraction", "flops",
                             "variants", "ratios"],
                "properties": {
                    "mode": {"type": "string", "enum": list(MODES)}, "size": {"type": "string"},
                    "batch": {"type": "integer"}, "img_size": {"type": "integer"},
                    "mask_ratio": {"type": "number"}, "visible_fraction": {"type": "number"},
                    "flops": {
                        "type": "object",
                        "required": ["dense_gflops", "stages_gflops", "sparse_ideal_gflops", "limit_speedup"],
                        "properties": {k: {"type": "number"} for k in
                                       ("dense_gflops", "stages_gflops", "sparse_ideal_gflops", "limit_speedup")},
                    },
                    "variants": {"type": "object", "additionalProperties": _VARIANT_RESULT},
                    "ratios": {
                        "type": "object",
                        "required": ["sparse_vs_dense_masked_throughput", "sparse_vs_dense_masked_memory",
                                     "sparse_vs_dense_throughput", "dense_masked_vs_dense_throughput"],
                        "additionalProperties": _NUM,
                    },
                },
            },
        },
        "targets": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["mode", "size", "batch", "img_size", "mask_ratio", "throughput_ratio", "memory_ratio",
                             "throughput_target", "memory_target", "met"],
                "properties": {"throughput_ratio": _NUM, "memory_ratio": _NUM, "met": {"type": ["boolean", "null"]}},
            },
        },
    },
}

_TYPES = {
    "object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
    "integer": int, "number": (int, float),
}


def validate(obj, schema: dict = RESULT_SCHEMA, path: str = "$") -> None:
    """Raise ``ValueError`` naming the first place where ``obj`` breaks ``schema``."""
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        ok = any(
            isinstance(obj, _TYPES[t]) and not (t in ("integer", "number") and isinstance(obj, bool))
            for t in types
        )
        if not ok:
            raise ValueError(f"{path}: expected {'/'.join(types)}, got {type(obj).__name__}")
    if "enum" in schema and obj not in schema["enum"]:
        raise ValueError(f"{path}: {obj!r} not in {schema['enum']}")
    if isinstance(obj, dict):
        for key in schema.get("required", []):
            if key not in obj:
                raise ValueError(f"{path}: missing {key!r}")
        props = schema.get("properties", {})
        for key, val in obj.items():
            sub = props.get(key, schema.get("additionalProperties"))
            if isinstance(sub, dict):
                validate(val, sub, f"{path}.{key}")
    if isinstance(obj, list) and "items" in schema:
        for i, val in enumerate(obj):
            validate(val, schema["items"], f"{path}[{i}]")


# ------------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------------
@dataclass
class BenchOptions:
    out: pathlib.Path
    device: str = "cpu"
    sizes: tuple[str, ...] = ("atto",)
    batches: tuple[int, ...] = (8,)
    img_sizes: tuple[int, ...] = (224,)
    mask_ratios: tuple[float, ...] = DEFAULT_MASK_RATIOS
    modes: tuple[str, ...] = MODES
    variants: tuple[str, ...] = VARIANTS
    warmup: int = 2
    steps: int = 5
    seed: int = 0
    in_chans: int = 3
    decoder_dim: int = 512
    decoder_depth: int = 1
    channels_last: bool = True
    label: str = "bench"
    note: str | None = None
    progress: bool = True
    time_budget_s: float | None = None
    precision: str = "fp32"  # fp32, or bf16 autocast as in training (precision=bf16)


def _split(text: str, conv, what: str) -> tuple:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError(f"{what}: empty list")
    try:
        return tuple(conv(t) for t in items)
    except ValueError:
        raise ValueError(f"{what}: cannot parse {text!r}") from None


def make_options(args) -> BenchOptions:
    """argparse namespace (all list options as comma-separated strings) -> checked ``BenchOptions``."""
    from .models.sizes import SIZES

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or auto, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    sizes = _split(args.sizes, str, "--sizes")
    for s in sizes:
        if s not in SIZES:
            raise ValueError(f"--sizes: unknown size {s!r} (one of {', '.join(SIZES)})")
    batches = _split(args.batch, int, "--batch")
    if min(batches) < 1:
        raise ValueError("--batch: batch sizes must be >= 1")
    img_sizes = _split(args.img_size, int, "--img-size")
    for s in img_sizes:
        if s < 32 or s % 32:
            raise ValueError(f"--img-size: {s} is not a positive multiple of 32")
    ratios = _split(args.mask_ratios, float, "--mask-ratios")
    for r in ratios:
        if not (0.0 <= r < 1.0) or math.isnan(r):
            raise ValueError(f"--mask-ratios: {r} is outside [0, 1)")
    modes = _split(args.modes, str, "--modes")
    variants = _split(args.variants, str, "--variants")
    for m in modes:
        if m not in MODES:
            raise ValueError(f"--modes: unknown mode {m!r} (forward, train)")
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"--variants: unknown variant {v!r} ({', '.join(VARIANTS)})")
    if args.steps < 1 or args.warmup < 0:
        raise ValueError("--steps must be >= 1 and --warmup >= 0")
    if args.in_chans < 1 or args.decoder_dim < 1 or args.decoder_depth < 0:
        raise ValueError("--in-chans and --decoder-dim must be >= 1, --decoder-depth >= 0")
    if args.time_budget is not None and args.time_budget <= 0:
        raise ValueError("--time-budget must be > 0 seconds")
    precision = getattr(args, "precision", "fp32")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"--precision must be fp32 or bf16, got {precision!r}")
    if not args.label or any(c in args.label for c in "/\\") or args.label.startswith("."):
        raise ValueError(f"--label must be a plain file name stem, got {args.label!r}")
    return BenchOptions(
        out=pathlib.Path(args.out), device=device, sizes=sizes, batches=batches, img_sizes=img_sizes,
        mask_ratios=tuple(dict.fromkeys(ratios)), modes=tuple(m for m in MODES if m in modes),
        variants=tuple(dict.fromkeys(variants)), warmup=args.warmup, steps=args.steps, seed=args.seed,
        in_chans=args.in_chans, decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth,
        channels_last=not args.no_channels_last, label=args.label, note=args.note, progress=not args.no_progress,
        time_budget_s=args.time_budget, precision=precision,
    )


# ------------------------------------------------------------------------------------------------
# Models: the three variants on the same weights
# ------------------------------------------------------------------------------------------------
class TimmEncoder(torch.nn.Module):
    """timm ConvNeXt V2 as an FCMAE encoder that ignores the mask: ``(B, Cin, H, W) -> (B, C, H/32, W/32)``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.forward_features(x)


def build_reference_state(opts: BenchOptions, size: str) -> dict[str, torch.Tensor]:
    """Seeded FCMAE weights (official layout); GRN gamma/beta made non-zero so GRN does real work."""
    from .models import FCMAE

    torch.manual_seed(opts.seed)
    model = FCMAE(size=size, in_chans=opts.in_chans, decoder_dim=opts.decoder_dim,
                  decoder_depth=opts.decoder_depth, encoder="dense_masked")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".grn." in name:
                p.normal_(0.0, 0.02)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def build_variant(variant: str, size: str, state: dict, opts_dict: dict) -> torch.nn.Module:
    """One benchmark variant with ``state`` loaded (strictly)."""
    from .models import FCMAE

    kw = dict(size=size, in_chans=opts_dict["in_chans"], decoder_dim=opts_dict["decoder_dim"],
              decoder_depth=opts_dict["decoder_depth"])
    if variant in ("sparse", "dense_masked"):
        model = FCMAE(encoder=variant, **kw)
        model.load_state_dict(state)
        return model
    import timm

    from .convert import sparse_to_timm

    model = FCMAE(encoder="dense_masked", **kw)
    model.load_state_dict(state)
    net = timm.create_model(f"convnextv2_{size}", pretrained=False, num_classes=0)
    missing, unexpected = net.load_state_dict(sparse_to_timm(state, size), strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise RuntimeError(f"timm weights do not match: missing {missing}, unexpected {unexpected}")
    model.encoder = TimmEncoder(net)
    return model


def count_flops(opts: BenchOptions, size: str, batch: int, img: int, mode: str) -> tuple[float, float]:
    """``(total, stages)`` GFLOPs (2 x multiply-adds of convs and linears) of one dense step, by formula.

    ``train`` = forward + backward = 3x forward (input and weight gradients) less the stem's input
    gradient, which nobody needs. Written out by hand because ``FlopCounterMode`` overcounts the
    backward of grouped (depthwise) convolutions (torch 2.14: 3.7x); its forward count agrees with
    this formula exactly (tested).
    """
    from .models.sizes import get_size

    depths, dims = get_size(size)
    stem = opts.in_chans * 16 * dims[0] * (img // 4) ** 2
    stages, res = 0, img // 4
    for i, (depth, c) in enumerate(zip(depths, dims)):
        if i > 0:
            res //= 2
            stages += 4 * dims[i - 1] * c * res * res  # 2x2 stride-2 downsampling
        stages += depth * (49 * c + 8 * c * c) * res * res  # depthwise 7x7, Linear(c, 4c), Linear(4c, c)
    g2, dd = (img // 32) ** 2, opts.decoder_dim
    decoder = (dims[-1] * dd + opts.decoder_depth * (49 * dd + 8 * dd * dd) + dd * 32 * 32 * opts.in_chans) * g2
    total = stem + stages + decoder
    if mode == "train":
        total, stages = 3 * total - stem, 3 * stages
    return 2 * batch * total / 1e9, 2 * batch * stages / 1e9


# ------------------------------------------------------------------------------------------------
# Worker process: one variant, driven step by step over a pipe
# ------------------------------------------------------------------------------------------------
def _rss_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


class _CpuPeak:
    """Per-configuration peak RSS: trim the heap, reset the high-water mark, read VmHWM later."""

    def __init__(self):
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except OSError:
            self._trim = None
        self.resettable = self._reset_hwm()

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        import gc

        gc.collect()
        if self._trim is not None:
            self._trim(0)
        self._reset_hwm()

    @staticmethod
    def peak_kb() -> int:
        return _rss_kb("VmHWM")


def _worker_main(conn, variant: str, size: str, state_path: str, opts_dict: dict) -> None:
    """Serve ``config`` / ``step`` / ``peak`` / ``stop`` requests for one variant."""
    try:
        import sparse_fcmae  # noqa: F401  (silences ME's CPU-only warning)
        import timm  # noqa: F401  (imported before the baseline: libraries are not the variant's memory)

        from .checkpoint import load_checkpoint
        from .models import convnextv2  # noqa: F401

        device = torch.device(opts_dict["device"])
        cuda = device.type == "cuda"
        cpu_peak = None if cuda else _CpuPeak()
        if cuda:
            torch.cuda.init()
            base = torch.cuda.memory_allocated(device)
        else:
            cpu_peak.reset()
            base = _rss_kb("VmRSS") * 1024
        blob = load_checkpoint(state_path)
        model = build_variant(variant, size, blob["state"], opts_dict).to(device)
        fmt = torch.channels_last if opts_dict["channels_last"] else torch.contiguous_format
        model = model.to(memory_format=fmt)
        imgs = blob["images"].to(device).contiguous(memory_format=fmt)
        opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, weight_decay=0.05)
        conn.send(("ok", {"memory_resettable": True if cuda else cpu_peak.resettable}))
    except Exception as e:  # report, so the run goes on with the other variants
        conn.send(("error", f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"))
        return

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    masks, mode = None, None
    # bf16: autocast around forward and loss, as the training loop does (float32 weights and optimizer)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=opts_dict.get("precision") == "bf16")
    while True:
        msg = conn.recv()
        try:
            if msg[0] == "stop":
                conn.send(("ok", None))
                return
            if msg[0] == "config":
                mode, masks = msg[1], [m.to(device) for m in msg[2]]
                model.train(mode == "train")
                sync()
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                else:
                    cpu_peak.reset()
                conn.send(("ok", None))
            elif msg[0] == "step":
                mask = masks[msg[1] % len(masks)]
                sync()
                t0 = time.perf_counter()
                if mode == "train":
                    opt.zero_grad(set_to_none=True)
                    with amp:
                        loss = model(imgs, mask)[0]
                    loss.backward()
                    opt.step()
                else:
                    with torch.no_grad(), amp:
                        loss = model(imgs, mask)[0]
                sync()
                dt = time.perf_counter() - t0
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {loss.item()}")
                conn.send(("ok", dt))
            elif msg[0] == "peak":
                peak = torch.cuda.max_memory_allocated(device) if cuda else cpu_peak.peak_kb() * 1024
                conn.send(("ok", (peak - base) / 2**20))
        except Exception as e:
            conn.send(("error", f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"))


class _Worker:
    def __init__(self, ctx, variant: str, size: str, state_path: str, opts_dict: dict):
        self.variant = variant
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, variant, size, state_path, opts_dict), daemon=True)
        self.proc.start()
        child.close()
        self.error: str | None = None
        self.info: dict = {}

    def ask(self, *msg):
        """Send a request; ``None`` (and ``self.error`` set) if the worker failed."""
        if self.error:
            return None
        try:
            if msg:
                self.conn.send(msg)
            status, value = self.conn.recv()
        except (EOFError, OSError, BrokenPipeError):
            status, value = "error", f"worker process died (exit code {self.proc.exitcode})"
        if status == "error":
            self.error = value
            return None
        return value

    def close(self) -> None:
        if not self.error and self.proc.is_alive():
            self.ask("stop")
        self.conn.close()  # a worker still waiting for requests gets EOF and exits
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------
def machine_info() -> dict:
    import timm

    cpu_model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cpu_model = cpu_model or platform.processor() or None
    try:  # the version of an importable MinkowskiEngine only (a broken install counts as none)
        import MinkowskiEngine as ME

        me_version = ME.__version__ + ("" if not torch.cuda.is_available() else
                                       (" (CUDA)" if ME.is_cuda_available() else " (CPU only)"))
    except Exception:
        me_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=pathlib.Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=pathlib.Path(__file__).resolve().parent, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        if commit and dirty:
            commit += "-dirty"
    except Exception:
        commit = None
    from . import ops

    ops_info = {}
    for name in ("sparse_depthwise_conv", "sparse_grn"):
        fn = getattr(ops, name, None)
        ops_info[name] = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}" if fn else "missing"
    ext = getattr(ops, "extension_available", None)  # the compiled kernels (issue 3), when present
    if callable(ext):
        ops_info["compiled_extension"] = bool(ext())
        ops_info["SPARSE_FCMAE_KERNELS"] = os.environ.get("SPARSE_FCMAE_KERNELS")
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model,
        "cpu_cores": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "timm": timm.__version__,
        "minkowskiengine": me_version,
        "git_commit": commit,
        "ops": ops_info,
        "load_average_start": _loadavg(),
        "load_average_end": None,
    }


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _paired_speedups(times: dict[str, list[float]], variants) -> dict[tuple[str, str], float]:
    """Median over rounds of ``t_b / t_a``: each round runs every variant back to back, so a ratio
    taken within a round sees nearly the same machine load (robust where other jobs share the CPU)."""
    out = {}
    for a in variants:
        for b in variants:
            ta, tb = times.get(a, []), times.get(b, [])
            if a != b and ta and len(ta) == len(tb):
                out[(a, b)] = _median([y / x for x, y in zip(ta, tb)])
    return out


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def run_benchmark(opts: BenchOptions) -> dict:
    """Run every configuration; returns the result dict (see the module docstring)."""
    import multiprocessing as mp

    from tqdm import tqdm

    from .checkpoint import save_checkpoint
    from .masking import num_kept, random_patch_mask

    machine = machine_info()
    cuda = opts.device == "cuda"
    memory_method = (
        "torch.cuda.max_memory_allocated minus the worker's allocation before the model was built"
        if cuda else
        "peak RSS (VmHWM, reset per configuration via /proc/self/clear_refs after malloc_trim) minus the "
        "worker's RSS before the model was built"
    )
    result = {
        "schema": SCHEMA_ID,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "settings": {
            "device": opts.device, "sizes": list(opts.sizes), "batches": list(opts.batches),
            "img_sizes": list(opts.img_sizes), "mask_ratios": list(opts.mask_ratios), "modes": list(opts.modes),
            "variants": list(opts.variants), "warmup": opts.warmup, "steps": opts.steps, "seed": opts.seed,
            "in_chans": opts.in_chans, "decoder_dim": opts.decoder_dim, "decoder_depth": opts.decoder_depth,
            "channels_last": opts.channels_last,
            "dtype": "float32" if opts.precision == "fp32" else "bfloat16 autocast (float32 weights)", "memory_method": memory_method,
            "note": opts.note, "time_budget_s": opts.time_budget_s, "stopped_early": False,
        },
        "variants": {v: {"available": True, "reason": None, "description": VARIANT_DESCRIPTIONS[v]}
                     for v in opts.variants},
        "results": [],
        "targets": [],
    }
    opts_dict = {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(opts).items()}
    groups = [(s, b, i) for s in opts.sizes for b in opts.batches for i in opts.img_sizes]
    n_steps = opts.warmup + opts.steps
    total = len(groups) * len(opts.modes) * len(opts.mask_ratios) * len(opts.variants) * n_steps
    bar = tqdm(total=total, disable=not opts.progress, unit="step", dynamic_ncols=True, file=sys.stderr)
    # CPU: forkserver, whose server imports the heavy libraries once; each worker then starts as a cheap
    # fork of a process that never ran torch compute. CUDA: spawn, since a library import that touches the
    # driver (an availability check) would leave every fork of the server unable to use the GPU.
    t_start = time.monotonic()
    use_fork = not cuda and "forkserver" in mp.get_all_start_methods()
    ctx = mp.get_context("forkserver" if use_fork else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["torch", "timm", "sparse_fcmae.bench", "sparse_fcmae.models"])
    with tempfile.TemporaryDirectory(prefix="sparse-fcmae-bench-") as tmp:
        for size, batch, img in groups:
            grid = (img // 32, img // 32)
            state = build_reference_state(opts, size)
            gen = torch.Generator().manual_seed(opts.seed + 1)
            images = torch.randn(batch, opts.in_chans, img, img, generator=gen)
            state_path = os.path.join(tmp, f"{size}-{batch}-{img}.pth")
            save_checkpoint({"state": state, "images": images}, state_path)
            bar.set_description(f"{size} b{batch} {img}px: starting workers")
            workers = [_Worker(ctx, v, size, state_path, opts_dict) for v in opts.variants]
            try:
                for w in workers:
                    w.info = w.ask() or {}
                    if w.error:
                        result["variants"][w.variant].update(available=False, reason=w.error)
                if not cuda and not all(w.info.get("memory_resettable", True) for w in workers if not w.error):
                    result["settings"]["memory_method"] = (
                        "running peak RSS (VmHWM could not be reset: /proc/self/clear_refs not writable) minus "
                        "the worker's RSS before the model was built")
                for mode in opts.modes:
                    dense_gf, stages_gf = count_flops(opts, size, batch, img, mode)
                    for ratio in opts.mask_ratios:
                        over = opts.time_budget_s is not None and time.monotonic() - t_start > opts.time_budget_s
                        if over and result["results"]:  # at least one configuration is always measured
                            result["settings"]["stopped_early"] = True  # the rows measured so far are kept
                            break
                        kept = num_kept(grid[0] * grid[1], ratio)
                        vis = kept / (grid[0] * grid[1])
                        ideal = dense_gf - (1.0 - vis) * stages_gf
                        mgen = torch.Generator().manual_seed(opts.seed + 1000 + int(round(ratio * 1000)))
                        masks = [random_patch_mask(batch, grid, ratio, generator=mgen) for _ in range(n_steps)]
                        times = {w.variant: [] for w in workers}
                        for w in workers:
                            w.ask("config", mode, masks)
                        for i in range(n_steps):
                            k = i % len(workers)
                            for w in workers[k:] + workers[:k]:  # rotate: no variant always runs first
                                bar.set_description(f"{mode} {size} b{batch} {img}px mask {ratio:.2f} {w.variant}")
                                dt = w.ask("step", i)
                                if dt is not None and i >= opts.warmup:
                                    times[w.variant].append(dt)
                                bar.update(1)
                        row_vars = {}
                        for w in workers:
                            peak = w.ask("peak")
                            if w.error:
                                row_vars[w.variant] = {"images_per_s": None, "median_s": None, "step_times_s": [],
                                                       "peak_mem_mb": None, "error": w.error}
                                continue
                            med = _median(times[w.variant])
                            row_vars[w.variant] = {"images_per_s": batch / med, "median_s": med,
                                                   "step_times_s": times[w.variant], "peak_mem_mb": peak,
                                                   "error": None}
                        paired = _paired_speedups(times, opts.variants) if all(not w.error for w in workers) else {}
                        tp = {v: r["images_per_s"] for v, r in row_vars.items()}
                        mem = {v: r["peak_mem_mb"] for v, r in row_vars.items()}
                        result["results"].append({
                            "mode": mode, "size": size, "batch": batch, "img_size": img, "mask_ratio": ratio,
                            "visible_fraction": vis,
                            "flops": {"dense_gflops": dense_gf, "stages_gflops": stages_gf,
                                      "sparse_ideal_gflops": ideal, "limit_speedup": dense_gf / ideal},
                            "variants": row_vars,
                            "ratios": {
                                "sparse_vs_dense_masked_throughput": _ratio(tp.get("sparse"), tp.get("dense_masked")),
                                "sparse_vs_dense_masked_memory": _ratio(mem.get("sparse"), mem.get("dense_masked")),
                                "sparse_vs_dense_throughput": _ratio(tp.get("sparse"), tp.get("dense")),
                                "dense_masked_vs_dense_throughput": _ratio(tp.get("dense_masked"), tp.get("dense")),
                                "sparse_vs_dense_masked_throughput_paired": paired.get(("sparse", "dense_masked")),
                                "sparse_vs_dense_throughput_paired": paired.get(("sparse", "dense")),
                            },
                        })
                for w in workers:
                    if w.error and result["variants"][w.variant]["available"]:
                        result["variants"][w.variant].update(available=False, reason=w.error)
            finally:
                for w in workers:
                    w.close()
    bar.close()
    machine["load_average_end"] = _loadavg()
    result["targets"] = _targets(result)
    return result


def _targets(result: dict) -> list[dict]:
    """The issue's target rows (training step, mask 0.6, 224 px) wherever this run measured them."""
    size, batch = TARGETS[result["settings"]["device"]]
    out = []
    for r in result["results"]:
        if (r["mode"], r["size"], r["batch"], r["img_size"]) == ("train", size, batch, 224) and abs(r["mask_ratio"] - 0.6) < 1e-9:
            tr, mr = r["ratios"]["sparse_vs_dense_masked_throughput"], r["ratios"]["sparse_vs_dense_masked_memory"]
            met = None if tr is None or mr is None else bool(tr >= TARGET_THROUGHPUT and mr <= TARGET_MEMORY)
            out.append({"mode": "train", "size": size, "batch": batch, "img_size": 224, "mask_ratio": 0.6,
                        "throughput_ratio": tr, "memory_ratio": mr, "throughput_target": TARGET_THROUGHPUT,
                        "memory_target": TARGET_MEMORY, "met": met})
    return out


# ------------------------------------------------------------------------------------------------
# Reports: markdown table and PNG plot
# ------------------------------------------------------------------------------------------------
def _fmt(x, spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def markdown_table(result: dict) -> str:
    """One table per (mode, size, batch, image size); columns as in the README."""
    m, s = result["machine"], result["settings"]
    lines = [
        f"# sparse-fcmae bench ({result['created']})",
        "",
        f"Device: {s['device']} ({m['gpu'] or m['cpu_model']}, {m['cpu_cores']} cores, {m['torch_threads']} threads); "
        f"torch {m['torch']}, timm {m['timm']}, MinkowskiEngine {m['minkowskiengine'] or 'not available'}; "
        f"commit {m['git_commit'] or 'unknown'}; load average {m['load_average_start']} -> {m['load_average_end']}.",
        f"Median of {s['steps']} timed steps after {s['warmup']} warm-up steps; {s['dtype']}; "
        f"channels_last {'on' if s['channels_last'] else 'off'}. Memory: {s['memory_method']}.",
    ]
    if s.get("note"):
        lines.append(f"Note: {s['note']}")
    if s.get("stopped_early"):
        lines.append(f"Stopped early: the time budget ({s['time_budget_s']} s) ran out; later configurations are missing.")
    for v, info in result["variants"].items():
        if not info["available"]:
            lines.append(f"Variant `{v}` not measured: {info['reason']}")
    keys = list(dict.fromkeys((r["mode"], r["size"], r["batch"], r["img_size"]) for r in result["results"]))
    for mode, size, batch, img in keys:
        lines += [
            "",
            f"## {mode}, {size}, batch {batch}, {img} px",
            "",
            "| mask ratio | visible | sparse img/s | dense-masked img/s | dense img/s | sparse / dense-masked | "
            "(paired) | sparse / dense | sparse MB | dense-masked MB | dense MB | memory sparse / dense-masked | "
            "FLOP limit |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result["results"]:
            if (r["mode"], r["size"], r["batch"], r["img_size"]) != (mode, size, batch, img):
                continue
            v, q = r["variants"], r["ratios"]

            def g(name, key):
                return v.get(name, {}).get(key)

            lines.append(
                f"| {r['mask_ratio']:.2f} | {r['visible_fraction']:.2f} | {_fmt(g('sparse', 'images_per_s'))} | "
                f"{_fmt(g('dense_masked', 'images_per_s'))} | {_fmt(g('dense', 'images_per_s'))} | "
                f"{_fmt(q['sparse_vs_dense_masked_throughput'], '.2f', 'x')} | "
                f"{_fmt(q.get('sparse_vs_dense_masked_throughput_paired'), '.2f', 'x')} | "
                f"{_fmt(q['sparse_vs_dense_throughput'], '.2f', 'x')} | {_fmt(g('sparse', 'peak_mem_mb'), '.0f')} | "
                f"{_fmt(g('dense_masked', 'peak_mem_mb'), '.0f')} | {_fmt(g('dense', 'peak_mem_mb'), '.0f')} | "
                f"{_fmt(q['sparse_vs_dense_masked_memory'], '.2f', 'x')} | {r['flops']['limit_speedup']:.2f}x |"
            )
    if result["targets"]:
        lines += ["", "## Targets (training step, mask 0.6, 224 px; sparse vs dense-masked)", ""]
        for t in result["targets"]:
            verdict = {True: "met", False: "not met", None: "not measurable"}[t["met"]]
            lines.append(
                f"- {t['size']}, batch {t['batch']}: throughput {_fmt(t['throughput_ratio'], '.2f', 'x')} "
                f"(target >= {t['throughput_target']}x), memory {_fmt(t['memory_ratio'], '.2f', 'x')} "
                f"(target <= {t['memory_target']}x): {verdict}"
            )
    return "\n".join(lines) + "\n"


_COLORS = {"sparse": (214, 39, 40), "dense_masked": (31, 119, 180), "dense": (44, 160, 44), "limit": (150, 150, 150)}


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = max(hi - lo, 1e-12)
    step = 10 ** math.floor(math.log10(span / n))
    for mult in (1, 2, 2.5, 5, 10):
        if span / (step * mult) <= n:
            step *= mult
            break
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + 1e-9 * span:
        ticks.append(round(t, 10))
        t += step
    return ticks


def plot_png(result: dict, path: pathlib.Path) -> None:
    """Throughput (images/s) and peak memory (MB) against mask ratio: one row per configuration."""
    from PIL import Image, ImageDraw, ImageFont

    keys = list(dict.fromkeys((r["mode"], r["size"], r["batch"], r["img_size"]) for r in result["results"]))
    pw, ph, pad_l, pad_r, pad_t, pad_b = 440, 330, 60, 20, 40, 50
    w, h = 3 * pw, max(1, len(keys)) * ph + 40
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    dev = result["machine"]["gpu"] or result["machine"]["cpu_model"] or result["settings"]["device"]
    d.text((10, 10), f"sparse-fcmae bench: {dev} ({result['created']})", fill="black", font=font)
    # legend
    x = w - 380
    for v in result["variants"]:
        d.line([(x, 16), (x + 24, 16)], fill=_COLORS[v], width=3)
        d.text((x + 28, 10), v, fill="black", font=font)
        x += 120
    for row, key in enumerate(keys):
        rows = [r for r in result["results"] if (r["mode"], r["size"], r["batch"], r["img_size"]) == key]
        panels = (("images_per_s", "images/s"), ("peak_mem_mb", "peak memory (MB)"),
                  ("speedup", "sparse / dense-masked throughput (grey: FLOP limit)"))
        for col, (metric, label) in enumerate(panels):
            ox, oy = col * pw, 40 + row * ph
            x0, y0, x1, y1 = ox + pad_l, oy + pad_t, ox + pw - pad_r, oy + ph - pad_b
            series = {}
            if metric == "speedup":  # the paired (within-round) ratio where present: steadier under load
                pts = [(r["mask_ratio"], r["ratios"].get("sparse_vs_dense_masked_throughput_paired",
                                                         r["ratios"]["sparse_vs_dense_masked_throughput"])) for r in rows]
                series["sparse"] = [(a, b) for a, b in pts if b is not None]
                series["limit"] = [(r["mask_ratio"], r["flops"]["limit_speedup"]) for r in rows]
            else:
                for v in result["variants"]:
                    pts = [(r["mask_ratio"], r["variants"].get(v, {}).get(metric)) for r in rows]
                    series[v] = [(a, b) for a, b in pts if b is not None]
            vals = [b for pts in series.values() for _, b in pts]
            mode, size, batch, img = key
            d.text((x0, oy + 6), f"{mode}, {size}, batch {batch}, {img} px", fill="black", font=font)
            d.text((x0, oy + 20), label, fill="black", font=font)
            d.rectangle([x0, y0, x1, y1], outline="black")
            if not vals:
                d.text((x0 + 10, y0 + 10), "no data", fill="black", font=font)
                continue
            ymax = max(vals) * 1.1 or 1.0
            yt = _nice_ticks(0.0, ymax)
            ymax = max(ymax, yt[-1])

            def px(xr, yv):
                return x0 + (x1 - x0) * xr, y1 - (y1 - y0) * (yv / ymax)

            for t in yt:
                _, yy = px(0, t)
                d.line([(x0, yy), (x1, yy)], fill=(225, 225, 225))
                d.text((ox + 5, yy - 6), f"{t:g}", fill="black", font=font)
            for t in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
                xx, _ = px(t, 0)
                d.line([(xx, y1), (xx, y1 + 4)], fill="black")
                d.text((xx - 8, y1 + 8), f"{t:.1f}", fill="black", font=font)
            d.text(((x0 + x1) / 2 - 30, y1 + 26), "mask ratio", fill="black", font=font)
            for v, pts in series.items():
                xy = [px(a, b) for a, b in sorted(pts)]
                if len(xy) > 1:
                    d.line(xy, fill=_COLORS[v], width=2)
                for xx, yy in xy:
                    d.ellipse([xx - 3, yy - 3, xx + 3, yy + 3], fill=_COLORS[v])

    from .checkpoint import atomic_write

    atomic_write(path, lambda f: im.save(f, format="PNG"))


def write_outputs(result: dict, out: pathlib.Path, label: str) -> dict[str, pathlib.Path]:
    """``<label>.json``, ``<label>.md``, ``<label>.png`` under ``out`` (each written atomically)."""
    from .checkpoint import atomic_write

    validate(result)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{label}.json", "md": out / f"{label}.md", "png": out / f"{label}.png"}
    atomic_write(paths["json"], lambda f: f.write((json.dumps(result, indent=1) + "\n").encode()))
    atomic_write(paths["md"], lambda f: f.write(markdown_table(result).encode()))
    plot_png(result, paths["png"])
    return paths


def main(opts: BenchOptions, from_json: str | None = None) -> dict[str, pathlib.Path]:
    """Run the benchmark (or re-render the results in ``from_json``) and write the outputs; their paths."""
    if opts.out.exists() and not opts.out.is_dir():
        raise ValueError(f"--out {opts.out} exists and is not a folder")
    if from_json is not None:
        try:
            result = json.loads(pathlib.Path(from_json).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"--from-json {from_json}: cannot read JSON ({e})") from None
        try:
            validate(result)
        except ValueError as e:
            raise ValueError(f"--from-json {from_json}: not a bench result: {e}") from None
        return write_outputs(result, opts.out, opts.label)
    result = run_benchmark(opts)
    return write_outputs(result, opts.out, opts.label)
