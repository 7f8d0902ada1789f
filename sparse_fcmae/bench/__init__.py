"""Sparse vs dense-masked vs dense FCMAE benchmark: throughput, peak memory and the FLOP limit.

``sparse-fcmae bench [options] --out DIR`` measures, in one run, on the same weights, images and masks:

* ``sparse``: ``FCMAE(encoder='sparse')`` (MinkowskiEngine; ``sparse_fcmae.ops`` kernels);
* ``dense_masked``: ``FCMAE(encoder='dense_masked')``, the same parameters run densely with the mask
  re-applied after every spatial op (as SparK and the official JAX code do): the baseline;
* ``dense``: timm ``convnextv2_<size>`` (weights mapped by ``convert.sparse_to_timm``) on the *whole*
  image, no masking, under the *same* FCMAE decoder and masked loss.

Each dense family runs in every configuration asked for (``--layouts`` channels_last / nchw,
``--executions`` eager / compiled with ``torch.compile``; ``cudnn.benchmark`` on CUDA), so the sparse
step is compared with the *best* baseline measured: each row names ``best_baseline`` (the fastest
dense-masked configuration) and ``best_dense``, and gives ``ratios.sparse_vs_best_baseline_throughput``
(ratio of medians), ``..._paired`` (median over rounds of the within-round time ratio: steadier under
load) and ``sparse_vs_best_baseline_memory``.

Modes: ``forward`` (whole FCMAE forward incl. decoder and loss, ``torch.no_grad``, ``eval()``) and
``train`` (zero_grad, forward, backward, AdamW step). Images/s = batch / median step time over
``steps`` timed steps after ``warmup`` untimed ones (also where ``torch.compile`` compiles).

Method (why it is fair): every configuration lives in its own worker process; the driver steps them
in lock step, one step at a time, rotating the order every step, so load drift hits all alike
(``driver``). Peak memory per configuration: on CUDA ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``; on CPU the peak RSS (``VmHWM``) after ``malloc_trim`` and a reset of the
high-water mark; both minus the worker's baseline before the model was built (weights, gradients,
optimizer state and activations), split into the steady state after the warm-up steps
(``steady_mem_mb``: weights, gradients, optimizer state, caches) and the peak above it (``step_mem_mb``:
activations and the optimizer's temporaries), so the part sparse changes reads apart from the part every
variant shares. FLOP limit (``count_flops``): conv/linear FLOPs of the dense step by
formula; the sparse encoder runs its stages on the visible fraction ``v`` of the sites, so
``limit_speedup`` = total / (total - (1 - v) * stages) is the sparse/dense-masked ratio at equal work
per FLOP. JSON schema: ``schema.RESULT_SCHEMA``.
"""
from __future__ import annotations

import json
import pathlib

from ..machine import machine_info  # noqa: F401
from .driver import TARGETS, run_benchmark, targets  # noqa: F401
from .options import (  # noqa: F401
    DEFAULT_MASK_RATIOS,
    EXECUTIONS,
    LAYOUTS,
    MODES,
    VARIANTS,
    BenchOptions,
    Config,
    make_options,
)
from .report import markdown_table, plot_png, write_outputs  # noqa: F401
from .schema import _VARIANT_RESULT, RESULT_SCHEMA, SCHEMA_ID, SCHEMA_IDS, validate  # noqa: F401
from .variants import TimmEncoder, build_reference_state, build_variant, count_flops, prepare  # noqa: F401


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
        return write_outputs(result, opts.out, opts.label, with_json=False)
    return write_outputs(run_benchmark(opts), opts.out, opts.label)
