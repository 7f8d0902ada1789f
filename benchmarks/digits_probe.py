"""Does FCMAE pretraining help? Linear probe on the embedded digits, pretrained vs random initialisation.

1. FCMAE pretraining (sparse encoder, atto) on the digits' train split only (the seeded 80/20 split);
2. convert the checkpoint to timm weights (``--verify``);
3. the same linear probe (frozen encoder, linear head, fixed seeds) from those weights and from random init,
   evaluated on the held-out test split.
Writes ``benchmarks/results/digits_probe.json``. Usage: ``python benchmarks/digits_probe.py [--epochs 10]``.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from sparse_fcmae.checkpoint import atomic_write  # noqa: E402
from sparse_fcmae.cli import compose  # noqa: E402
from sparse_fcmae.convert import convert_file  # noqa: E402
from sparse_fcmae.finetune import finetune  # noqa: E402
from sparse_fcmae.machine import machine_info  # noqa: E402
from sparse_fcmae.training import pretrain  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20, help="pretraining epochs")
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--probe-epochs", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(ROOT / "runs" / "digits_probe"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "digits_probe.json"))
    a = ap.parse_args()
    work = pathlib.Path(a.work)
    common = [f"seed={a.seed}", f"data.img_size={a.img_size}", "device=cpu"]

    t0 = time.perf_counter()
    pre_cfg = compose("pretrain", [*common, f"run_dir={work / 'pretrain'}", f"optim.epochs={a.epochs}", "data.split=train"])
    pre = pretrain(pre_cfg)
    t_pre = time.perf_counter() - t0

    weights = work / "fcmae_atto.safetensors"
    conv = convert_file(pre["checkpoint"], weights, verify=True)

    probes = {}
    for name, w in (("fcmae", str(weights)), ("random_init", "null")):
        t1 = time.perf_counter()
        cfg = compose("linprobe", [*common, f"weights={w}", f"run_dir={work / ('linprobe-' + name)}",
                                   f"split_seed={a.seed}", f"optim.epochs={a.probe_epochs}"])
        res = finetune(cfg)
        probes[name] = {"top1": res["top1"], "final_train_loss": res["history"][-1]["train_loss"],
                        "seconds": round(time.perf_counter() - t1, 1)}

    result = {
        "benchmark": "digits linear probe: FCMAE-pretrained vs random init (convnextv2_atto, sparse encoder)",
        "data": "scikit-learn digits, seeded 80/20 split: pretraining and probe train on the train split (1437), "
                "top-1 on the held-out test split (360)",
        "img_size": a.img_size, "seed": a.seed,
        "pretrain": {"epochs": a.epochs, "mask_ratio": pre_cfg.mask_ratio, "batch_size": pre_cfg.data.batch_size,
                     "losses": pre["losses"], "seconds": round(t_pre, 1)},
        "convert_verify_rel_err": conv["verify_rel_err"],
        "probe": {"epochs": a.probe_epochs, "head": "linear on pooled, parameter-free LayerNorm'd features", **probes},
        "machine": machine_info(),
        "note": "accuracies are deterministic up to thread scheduling; timings depend on the machine's load",
    }
    text = json.dumps(result, indent=2)
    atomic_write(a.out, lambda f: f.write(text.encode()))
    print(text)


if __name__ == "__main__":
    main()
