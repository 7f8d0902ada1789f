"""Pretraining, in the order a run goes: ``pretrain`` (config checks, model, run folder, orchestration),
``engine`` (one epoch), ``state`` (the checkpoint format, written and read in one place), ``schedule`` (lr
and parameter groups, shared with fine-tuning), ``runtime`` (seeding, device, RNG state)."""
from .pretrain import build_model, load_init_weights, pretrain, validate_config
from .schedule import lr_at, param_groups

__all__ = ["build_model", "load_init_weights", "lr_at", "param_groups", "pretrain", "validate_config"]
