"""Fine-tuning and linear probing of timm ConvNeXt V2 from converted (or on-the-fly converted) weights.

``finetune``: AdamW with layer-wise lr decay, label smoothing, optional EMA, warm-up + cosine schedule.
``linprobe``: the encoder (and the parameter-free final LayerNorm) frozen; only the linear head trains, on
pooled features computed once (the encoder is deterministic in eval mode, so caching them is exact).

In the order a run goes: ``checks`` (config refusals), ``model`` (the timm classifier, its optimizer, Mixup),
``data`` (splits and seeded, resumable loaders), ``loop`` (one epoch, evaluation), ``state`` (the checkpoint,
resume), ``run`` (orchestration: run folder, lock, preemption). None of it imports MinkowskiEngine; the run
folder's checkpoint machinery is pretraining's (``training.state``), shared.
"""
from .checks import validate
from .data import build_splits
from .loop import evaluate, train_step
from .model import build_classifier, build_mixup, build_optimizer, load_timm_weights
from .run import finetune

__all__ = ["build_classifier", "build_mixup", "build_optimizer", "build_splits", "evaluate", "finetune",
           "load_timm_weights", "train_step", "validate"]
