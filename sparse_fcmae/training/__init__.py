"""Pretraining, in the order a run goes: ``pretrain`` (config checks, model, run folder, orchestration),
``engine`` (one epoch), ``state`` (the checkpoint format, written and read in one place), ``schedule`` (lr
and parameter groups, shared with fine-tuning), ``runtime`` (seeding, device, RNG state).

``runtime``, ``schedule`` and ``state`` need no model: fine-tuning imports them, so ``pretrain`` (which
imports the sparse model, hence MinkowskiEngine) loads only when one of its names is first asked for."""
from .schedule import lr_at, param_groups

_PRETRAIN = ("build_model", "load_init_weights", "pretrain", "validate_config")
__all__ = ["build_model", "load_init_weights", "lr_at", "param_groups", "pretrain", "validate_config"]


def __getattr__(name: str):
    if name not in _PRETRAIN:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    module = importlib.import_module(".pretrain", __name__)
    # bind the functions over the submodule's name (importing it set `pretrain` to the module)
    globals().update({n: getattr(module, n) for n in _PRETRAIN})
    return globals()[name]
