"""The bench result's JSON schema (a JSON-Schema subset) and its validator.

Schema 2 (this version) may also hold volumes (``settings.spatial_dims`` 3: ``img_size`` is a cube's edge) and a
memory fit (``fit``: per size, edge and mask ratio, the largest training batch each configuration fits in
``settings.mem_budget_gb``). Schema 2 adds per-row ``best_baseline`` / ``best_dense`` and the ``sparse_vs_best_*``
ratios, and per-variant ``family`` / ``layout`` / ``compiled``; schema 1 files (results committed
before baselines were searched) still validate and render.
"""
from __future__ import annotations

SCHEMA_ID = "sparse-fcmae-bench/2"
SCHEMA_IDS = ("sparse-fcmae-bench/1", SCHEMA_ID)

_NUM = {"type": ["number", "null"]}
_STR = {"type": ["string", "null"]}
_VARIANT_RESULT = {
    "type": "object",
    "required": ["images_per_s", "median_s", "step_times_s", "peak_mem_mb", "error"],
    "properties": {
        "images_per_s": _NUM, "median_s": _NUM, "peak_mem_mb": _NUM, "error": _STR,
        "step_times_s": {"type": "array", "items": {"type": "number"}},
        "sparse_speedup_paired": _NUM, "warmup_s": _NUM,
        "compiled_graphs": {"type": ["integer", "null"]},
        "steady_mem_mb": _NUM, "step_mem_mb": _NUM,
    },
}
RESULT_SCHEMA = {
    "type": "object",
    "required": ["schema", "created", "machine", "settings", "variants", "results", "targets"],
    "properties": {
        "schema": {"type": "string", "enum": list(SCHEMA_IDS)},
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
                "backends": {"type": "object"},
            },
        },
        "settings": {
            "type": "object",
            "required": ["device", "sizes", "batches", "img_sizes", "mask_ratios", "modes", "variants", "warmup",
                         "steps", "seed", "in_chans", "decoder_dim", "decoder_depth", "dtype", "memory_method", "note"],
            "properties": {
                "device": {"type": "string", "enum": ["cpu", "cuda"]},
                "sizes": {"type": "array", "items": {"type": "string"}},
                "batches": {"type": "array", "items": {"type": "integer"}},
                "img_sizes": {"type": "array", "items": {"type": "integer"}},
                "mask_ratios": {"type": "array", "items": {"type": "number"}},
                "modes": {"type": "array", "items": {"type": "string", "enum": ["forward", "train"]}},
                "variants": {"type": "array", "items": {"type": "string"}},
                "layouts": {"type": "array", "items": {"type": "string"}},
                "executions": {"type": "array", "items": {"type": "string"}},
                "sparse_layout": {"type": "string"}, "sparse_compile": {"type": ["string", "null"]},
                "sparse_graph": {"type": "boolean"},
                "warmup": {"type": "integer"}, "steps": {"type": "integer"}, "seed": {"type": "integer"},
                "in_chans": {"type": "integer"}, "decoder_dim": {"type": "integer"},
                "decoder_depth": {"type": "integer"}, "channels_last": {"type": "boolean"},
                "dtype": {"type": "string"}, "memory_method": {"type": "string"}, "note": _STR,
                "time_budget_s": _NUM, "stopped_early": {"type": "boolean"},
                "spatial_dims": {"type": "integer", "enum": [2, 3]}, "mem_budget_gb": _NUM,
                "fit_max_batch": {"type": "integer"}, "fit_only": {"type": "boolean"},
            },
        },
        "variants": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["available", "reason", "description"],
                "properties": {"available": {"type": "boolean"}, "reason": _STR, "description": {"type": "string"},
                               "family": {"type": "string"}, "layout": {"type": "string"},
                               "compiled": {"type": "boolean"}, "graph": {"type": "boolean"}},
            },
        },
        "results": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["mode", "size", "batch", "img_size", "mask_ratio", "visible_fraction", "flops",
                             "variants", "ratios"],
                "properties": {
                    "mode": {"type": "string", "enum": ["forward", "train"]}, "size": {"type": "string"},
                    "batch": {"type": "integer"}, "img_size": {"type": "integer"},
                    "mask_ratio": {"type": "number"}, "visible_fraction": {"type": "number"},
                    "best_baseline": _STR, "best_dense": _STR,
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
        "fit": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["size", "img_size", "mask_ratio", "budget_mb", "max_batch_tried", "variants",
                             "best_baseline", "best_dense", "sparse_vs_best_baseline_batch"],
                "properties": {
                    "size": {"type": "string"}, "img_size": {"type": "integer"}, "mask_ratio": {"type": "number"},
                    "budget_mb": {"type": "number"}, "max_batch_tried": {"type": "integer"},
                    "best_baseline": _STR, "best_dense": _STR, "sparse_vs_best_baseline_batch": _NUM,
                    "sparse_vs_best_dense_batch": _NUM,
                    "variants": {"type": "object", "additionalProperties": {
                        "type": "object", "required": ["max_batch", "peak_mem_mb", "trials"],
                        "properties": {
                            "max_batch": {"type": "integer"}, "peak_mem_mb": _NUM,
                            "trials": {"type": "array", "items": {
                                "type": "object", "required": ["batch", "peak_mem_mb", "fits", "error"],
                                "properties": {"batch": {"type": "integer"}, "peak_mem_mb": _NUM,
                                               "fits": {"type": "boolean"}, "error": _STR}}},
                        }}},
                },
            },
        },
        "targets": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["mode", "size", "batch", "img_size", "mask_ratio", "throughput_ratio", "memory_ratio",
                             "throughput_target", "memory_target", "met"],
                "properties": {"throughput_ratio": _NUM, "memory_ratio": _NUM, "met": {"type": ["boolean", "null"]},
                               "step_memory_ratio": _NUM},
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
