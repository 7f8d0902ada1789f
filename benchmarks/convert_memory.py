"""Peak memory of ``sparse-fcmae convert`` on a ``huge`` FCMAE checkpoint (random weights, official layout).

Each step runs in its own subprocess, which reports its own peak RSS (``ru_maxrss``), so the numbers are
not mixed with this driver's memory. The checkpoint holds the encoder (~657M parameters) and a 1-block
512-wide decoder, as the official FCMAE checkpoints do (without optimizer state, the harder case: the
budget is relative to the file). Target: peak RSS <= 2.5x the checkpoint size.
Writes ``benchmarks/results/convert_memory.json``. Needs ~3x the checkpoint (~8 GB) of free disk and RAM.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]

MAKE = r"""
import argparse, json, resource, sys, time, torch
sys.path.insert(0, {root!r})
from sparse_fcmae.convert import convert_items, timm_shapes
size, path = {size!r}, {path!r}
t0 = time.perf_counter()
g = torch.Generator().manual_seed(0)
meta = {{k: torch.empty(s, device="meta") for k, s in timm_shapes(size, 3).items()}}
state = {{}}
for k, v in convert_items(meta, "timm", "sparse", size):
    state["encoder." + k] = torch.randn(v.shape, generator=g) * 0.02
dec = 512
state.update({{"proj.weight": torch.randn(dec, meta["stages.3.blocks.0.conv_dw.weight"].shape[0], 1, 1) * 0.02,
              "proj.bias": torch.zeros(dec), "mask_token": torch.zeros(1, dec, 1, 1),
              "decoder.0.dwconv.weight": torch.randn(dec, 1, 7, 7) * 0.02, "decoder.0.dwconv.bias": torch.zeros(dec),
              "decoder.0.norm.weight": torch.ones(dec), "decoder.0.norm.bias": torch.zeros(dec),
              "decoder.0.pwconv1.weight": torch.randn(4 * dec, dec) * 0.02, "decoder.0.pwconv1.bias": torch.zeros(4 * dec),
              "decoder.0.grn.gamma": torch.zeros(1, 1, 1, 4 * dec), "decoder.0.grn.beta": torch.zeros(1, 1, 1, 4 * dec),
              "decoder.0.pwconv2.weight": torch.randn(dec, 4 * dec) * 0.02, "decoder.0.pwconv2.bias": torch.zeros(dec),
              "pred.weight": torch.randn(32 * 32 * 3, dec, 1, 1) * 0.02, "pred.bias": torch.zeros(32 * 32 * 3)}})
n = sum(v.numel() for k, v in state.items() if k.startswith("encoder."))
torch.save({{"model": state, "epoch": 0, "args": argparse.Namespace(model="convnextv2_{size}", decoder_depth=1, decoder_embed_dim=dec)}}, path)
print("RESULT", json.dumps({{"encoder_params": n, "seconds": time.perf_counter() - t0}}))
"""

CONVERT = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
import torch, timm  # imported before measuring the baseline, as the CLI imports them
from sparse_fcmae.convert import convert_file
import sparse_fcmae.models
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
convert_file({src!r}, {out!r}, target={target!r}, log=lambda *a: None)
print("RESULT", json.dumps({{"seconds": time.perf_counter() - t0, "baseline_rss": base,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""


def run(code: str) -> dict:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"subprocess failed:\n{r.stderr[-3000:]}")
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="huge")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temp folder, removed afterwards)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "convert_memory.json"))
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from sparse_fcmae.checkpoint import atomic_write
    from sparse_fcmae.convert import timm_shapes
    from sparse_fcmae.machine import machine_info

    work = pathlib.Path(a.workdir or tempfile.mkdtemp(prefix="convert_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        src = work / f"fcmae_{a.size}.pth"
        made = run(MAKE.format(root=str(ROOT), size=a.size, path=str(src)))
        ckpt_bytes = src.stat().st_size
        print(f"checkpoint {src}: {ckpt_bytes / 2**30:.2f} GiB, {made['encoder_params'] / 1e6:.1f}M encoder parameters")
        results = {}
        for target, name in (("timm", f"{a.size}.safetensors"), ("timm", f"{a.size}_timm.pth"), ("official", f"{a.size}_official.pth")):
            out = work / name
            r = run(CONVERT.format(root=str(ROOT), src=str(src), out=str(out), target=target))
            r.update(output=name, target=target, output_bytes=out.stat().st_size, peak_over_checkpoint=r["peak_rss"] / ckpt_bytes)
            if name.endswith(".safetensors"):  # a cheap completeness check of the streamed file
                from safetensors import safe_open

                with safe_open(str(out), "pt") as f:
                    r["complete"] = set(f.keys()) == set(timm_shapes(a.size, 3)) | {"head.norm.weight", "head.norm.bias"}
            out.unlink()
            results[name] = r
            print(f"{name}: peak RSS {r['peak_rss'] / 2**30:.2f} GiB = {r['peak_over_checkpoint']:.2f}x the checkpoint "
                  f"(imports alone {r['baseline_rss'] / 2**30:.2f} GiB), {r['seconds']:.0f} s")
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    res = {"benchmark": f"peak RSS of sparse-fcmae convert, convnextv2_{a.size} FCMAE checkpoint (official format, fp32)",
           "checkpoint_bytes": ckpt_bytes, "encoder_params": made["encoder_params"], "limit": "2.5x checkpoint",
           "conversions": results, "machine": machine_info(),
           "note": "peak RSS includes the interpreter, torch, timm and MinkowskiEngine imports (baseline_rss); "
                   "timings are noisy (shared CPU)"}
    text = json.dumps(res, indent=2)
    atomic_write(a.out, lambda f: f.write(text.encode()))
    print(text)


if __name__ == "__main__":
    main()
