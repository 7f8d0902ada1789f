"""What one ``sparse-fcmae bench`` run measures: options, checked once, and the configurations they span."""
from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass

import torch

FAMILIES = ("sparse", "dense_masked", "dense")
VARIANTS = FAMILIES  # the model families (``--variants``); each dense one runs in several configurations
MODES = ("forward", "train")
LAYOUTS = ("channels_last", "nchw")
EXECUTIONS = ("eager", "compiled")
DEFAULT_MASK_RATIOS = (0.0, 0.3, 0.5, 0.6, 0.75, 0.9)
FAMILY_DESCRIPTIONS = {
    "sparse": "FCMAE, sparse MinkowskiEngine encoder on the visible sites",
    "dense_masked": "FCMAE, dense encoder with the mask re-applied after every spatial op",
    "dense": "timm convnextv2 encoder on the whole image (no masking) + the same FCMAE decoder and loss",
}
DENSE_3D = "ConvNeXtV2_3D encoder on the whole volume (no masking) + the same FCMAE decoder and loss"
# what a run measures when its options leave them out: images, or volumes (--spatial-dims 3)
DEFAULTS = {2: {"batches": (8,), "img_sizes": (224,), "in_chans": 3, "sparse_layout": "channels_last"},
            3: {"batches": (2,), "img_sizes": (64,), "in_chans": 1, "sparse_layout": "nchw"}}
_SHORT = {"channels_last": "cl", "nchw": "nchw"}


@dataclass(frozen=True)
class Config:
    """One measured configuration: a model family in a memory layout, eager or ``torch.compile``d."""

    family: str
    layout: str = "channels_last"
    compiled: bool = False
    compile_mode: str = "default"  # torch.compile's mode where compiled
    graph: bool = False  # sparse: the encoder's graph path (always when compiled), else the MinkowskiEngine path

    @property
    def name(self) -> str:
        if self.family == "sparse":  # one configuration per run (its dense stem and decoder run in `layout`)
            return "sparse"
        return f"{self.family}[{_SHORT[self.layout]}{',compiled' if self.compiled else ''}]"

    @property
    def memory_format(self) -> torch.memory_format:
        """The logical layout (what ``DenseMaskedConvNeXtV2.set_memory_format`` takes)."""
        return torch.channels_last if self.layout == "channels_last" else torch.contiguous_format

    def tensor_format(self, spatial_dims: int = 2) -> torch.memory_format:
        """The layout of a ``2 + spatial_dims``-D tensor: channels_last is ``channels_last_3d`` for volumes."""
        if self.layout == "channels_last" and spatial_dims == 3:
            return torch.channels_last_3d
        return self.memory_format

    def describe(self, spatial_dims: int = 2) -> str:
        layout = "channels_last_3d" if self.layout == "channels_last" and spatial_dims == 3 else self.layout
        how = f"; {layout}, {'torch.compile' if self.compiled else 'eager'}"
        if self.family == "sparse":
            how = f"; stem and decoder {layout}, " + (
                f"graph path, step torch.compile'd (mode {self.compile_mode})" if self.compiled
                else "graph path, eager" if self.graph else "MinkowskiEngine path, eager")
        what = DENSE_3D if self.family == "dense" and spatial_dims == 3 else FAMILY_DESCRIPTIONS[self.family]
        return what + how


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
    layouts: tuple[str, ...] = LAYOUTS
    executions: tuple[str, ...] = EXECUTIONS
    sparse_layout: str = "channels_last"
    sparse_compile: str | None = None  # torch.compile mode of the step on the graph path (SparseConvNeXtV2.use_graph)
    sparse_graph: bool = False  # the graph path eagerly (implied by sparse_compile)
    warmup: int = 2
    steps: int = 5
    seed: int = 0
    in_chans: int = 3
    decoder_dim: int = 512
    decoder_depth: int = 1
    label: str = "bench"
    note: str | None = None
    progress: bool = True
    time_budget_s: float | None = None
    precision: str = "fp32"  # fp32, or bf16 autocast as in training (precision=bf16)
    spatial_dims: int = 2  # 3: volumes (img_sizes are cube edges)
    mem_budget_gb: float | None = None  # memory fit: the largest training batch each configuration fits
    fit_max_batch: int = 64
    fit_only: bool = False  # no throughput rows, the memory fit alone

    def sparse_config(self) -> Config | None:
        if "sparse" not in self.variants:
            return None
        compiled = self.sparse_compile is not None
        return Config("sparse", self.sparse_layout, compiled, self.sparse_compile or "default",
                      graph=compiled or self.sparse_graph)

    def groups(self) -> list[list[Config]]:
        """The dense configurations, one group per (execution, layout), eager first: a group's workers
        run side by side with the sparse one (GPU memory holds one group, not all)."""
        dense = [f for f in self.variants if f != "sparse"]
        return [[Config(f, layout, execution == "compiled") for f in dense]
                for execution in self.executions for layout in self.layouts] if dense else [[]]


def _split(text: str, conv, what: str) -> tuple:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError(f"{what}: empty list")
    try:
        return tuple(conv(t) for t in items)
    except ValueError:
        raise ValueError(f"{what}: cannot parse {text!r}") from None


def _choices(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    items = _split(text, str, what)
    for x in items:
        if x not in allowed:
            raise ValueError(f"{what}: unknown value {x!r} (one of {', '.join(allowed)})")
    return tuple(dict.fromkeys(items))


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _compile_mode(mode: str | None) -> str | None:
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"--sparse-compile: unknown mode {mode!r} (one of {', '.join(COMPILE_MODES)})")
    return mode


def make_options(args) -> BenchOptions:
    """argparse namespace (all list options as comma-separated strings) -> checked ``BenchOptions``."""
    from ..models.sizes import SIZES

    dims = getattr(args, "spatial_dims", 2)
    if dims not in (2, 3):
        raise ValueError(f"--spatial-dims must be 2 (images) or 3 (volumes), got {dims}")
    default = DEFAULTS[dims]
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or auto, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    sizes = _choices(args.sizes, tuple(SIZES), "--sizes")
    batches = _split(args.batch, int, "--batch") if args.batch is not None else default["batches"]
    if min(batches) < 1:
        raise ValueError("--batch: batch sizes must be >= 1")
    img_sizes = _split(args.img_size, int, "--img-size") if args.img_size is not None else default["img_sizes"]
    for s in img_sizes:
        if s < 32 or s % 32:
            raise ValueError(f"--img-size: {s} is not a positive multiple of 32")
    ratios = _split(args.mask_ratios, float, "--mask-ratios")
    for r in ratios:
        if not (0.0 <= r < 1.0) or math.isnan(r):
            raise ValueError(f"--mask-ratios: {r} is outside [0, 1)")
    modes = _choices(args.modes, MODES, "--modes")
    variants = _choices(args.variants, VARIANTS, "--variants")
    layouts = _choices(args.layouts, LAYOUTS, "--layouts")
    executions = _choices(args.executions, EXECUTIONS, "--executions")
    sparse_layout = args.sparse_layout or default["sparse_layout"]
    in_chans = args.in_chans if args.in_chans is not None else default["in_chans"]
    if sparse_layout not in LAYOUTS:
        raise ValueError(f"--sparse-layout: unknown value {args.sparse_layout!r} (one of {', '.join(LAYOUTS)})")
    if args.steps < 1 or args.warmup < 0:
        raise ValueError("--steps must be >= 1 and --warmup >= 0")
    if in_chans < 1 or args.decoder_dim < 1 or args.decoder_depth < 0:
        raise ValueError("--in-chans and --decoder-dim must be >= 1, --decoder-depth >= 0")
    if args.time_budget is not None and args.time_budget <= 0:
        raise ValueError("--time-budget must be > 0 seconds")
    precision = getattr(args, "precision", "fp32")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"--precision must be fp32 or bf16, got {precision!r}")
    budget, fit_max = getattr(args, "mem_budget_gb", None), getattr(args, "fit_max_batch", 64)
    if budget is not None and not (budget > 0 and math.isfinite(budget)):
        raise ValueError(f"--mem-budget-gb must be a positive number of GiB, got {budget}")
    if fit_max < 1:
        raise ValueError(f"--fit-max-batch must be >= 1, got {fit_max}")
    fit_only = bool(getattr(args, "fit_only", False))
    if fit_only and budget is None:
        raise ValueError("--fit-only measures the memory fit alone: give --mem-budget-gb too")
    if not args.label or any(c in args.label for c in "/\\") or args.label.startswith("."):
        raise ValueError(f"--label must be a plain file name stem, got {args.label!r}")
    return BenchOptions(
        out=pathlib.Path(args.out), device=device, sizes=sizes, batches=batches, img_sizes=img_sizes,
        mask_ratios=tuple(dict.fromkeys(ratios)), modes=tuple(m for m in MODES if m in modes),
        variants=variants, layouts=layouts, executions=executions, sparse_layout=sparse_layout,
        sparse_compile=_compile_mode(getattr(args, "sparse_compile", None)),
        sparse_graph=bool(getattr(args, "sparse_graph", False)),
        warmup=args.warmup, steps=args.steps, seed=args.seed,
        in_chans=in_chans, decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth,
        label=args.label, note=args.note, progress=not args.no_progress,
        time_budget_s=args.time_budget, precision=precision, spatial_dims=dims, mem_budget_gb=budget,
        fit_max_batch=fit_max, fit_only=fit_only,
    )
