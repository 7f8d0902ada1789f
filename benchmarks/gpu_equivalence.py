"""The sparse encoder on a GPU against its oracles, before any GPU timing is trusted.

The unit tests check these on CPU; this runs the same checks with MinkowskiEngine's CUDA backend and
the CUDA kernels: the sparse encoder at mask 0 against timm, at mask 0.6 against the dense-masked
encoder (forward and every parameter gradient), the whole FCMAE loss and its gradients, and the GPU
result against the CPU one; for images and for volumes (64^3). float32 with TF32 off, so the tolerances are the CPU tests' own.
Writes JSON; exit 1 if a check fails.

  python benchmarks/gpu_equivalence.py --out $OUT/gpu_equivalence.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sparse_fcmae.checkpoint import atomic_write  # noqa: E402


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    n = b.norm()
    return float((a - b).norm() / n) if n > 0 else float((a - b).norm())


@torch.no_grad()
def randomize_(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    for p in model.parameters():  # GRN gamma/beta start at zero: perturb so every parameter matters
        p.add_(torch.randn_like(p) * scale)
    return model


def check_timm(dev, size: str, img: int) -> dict:
    import timm

    from sparse_fcmae.convert import sparse_to_timm
    from sparse_fcmae.models import SparseConvNeXtV2

    enc = randomize_(SparseConvNeXtV2(size)).eval()
    ref = timm.create_model(f"convnextv2_{size}", pretrained=False, num_classes=0).eval()
    ref.load_state_dict(sparse_to_timm(enc.state_dict(), size), strict=False)
    enc, ref = enc.to(dev), ref.to(dev)
    x = torch.randn(4, 3, img, img, device=dev)
    with torch.no_grad():
        err = rel_err(enc.forward_features(x), ref.forward_features(x))
    return {"name": f"mask 0 vs timm ({size}, {img}px)", "rel_err": err, "tol": 1e-5, "ok": err < 1e-5}


def check_dense_masked(dev, size: str, img: int, ratio: float, dims: int = 2, in_chans: int = 3) -> list[dict]:
    """``dims=3``: volumes of edge ``img`` (343-tap depthwise kernels, 2^3 downsampling)."""
    from sparse_fcmae.masking import random_patch_mask
    from sparse_fcmae.models import DenseMaskedConvNeXtV2, SparseConvNeXtV2

    kw = dict(in_chans=in_chans, spatial_dims=dims)
    sparse = randomize_(SparseConvNeXtV2(size, **kw))
    dense = DenseMaskedConvNeXtV2(size, **kw)
    dense.load_state_dict(sparse.state_dict())
    cpu_sparse = SparseConvNeXtV2(size, **kw)
    cpu_sparse.load_state_dict(sparse.state_dict())
    sparse, dense = sparse.to(dev), dense.to(dev)
    x = torch.randn(5, in_chans, *(img,) * dims)
    g = img // 32
    mask = random_patch_mask(5, (g,) * dims, ratio)
    if dims == 3:
        size = f"{size}, {img}^3 volumes"
    mask[-1] = 1  # one sample with nothing visible: must stay finite (zeros)
    out_s, out_d = sparse(x.to(dev), mask.to(dev)), dense(x.to(dev), mask.to(dev))
    out_c = cpu_sparse(x, mask)
    w = torch.randn_like(out_s)
    (out_s * w).sum().backward()
    (out_d * w).sum().backward()
    (out_c * w.cpu()).sum().backward()
    checks = [
        {"name": f"mask {ratio} forward, sparse vs dense-masked ({size}, {img}px)",
         "rel_err": rel_err(out_s, out_d), "tol": 1e-5},
        {"name": f"mask {ratio} forward, GPU vs CPU sparse ({size})", "rel_err": rel_err(out_s, out_c), "tol": 1e-5},
        {"name": f"all finite with a fully masked sample ({size})", "rel_err": 0.0 if torch.isfinite(out_s).all() else 1.0,
         "tol": 0.5},
    ]
    worst, worst_cpu = ("", 0.0), ("", 0.0)
    grads_d = dict(dense.named_parameters())
    grads_c = dict(cpu_sparse.named_parameters())
    for name, p in sparse.named_parameters():
        e = rel_err(p.grad, grads_d[name].grad)
        ec = rel_err(p.grad, grads_c[name].grad)
        worst = max(worst, (name, e), key=lambda t: t[1])
        worst_cpu = max(worst_cpu, (name, ec), key=lambda t: t[1])
    checks.append({"name": f"every gradient, sparse vs dense-masked ({size}); worst {worst[0]}",
                   "rel_err": worst[1], "tol": 1e-4})
    checks.append({"name": f"every gradient, GPU vs CPU sparse ({size}); worst {worst_cpu[0]}",
                   "rel_err": worst_cpu[1], "tol": 1e-4})
    for c in checks:
        c["ok"] = c["rel_err"] < c["tol"]
    return checks


def check_fcmae(dev, size: str, img: int, ratio: float, dims: int = 2, in_chans: int = 3) -> list[dict]:
    from sparse_fcmae.masking import random_patch_mask
    from sparse_fcmae.models import FCMAE

    a = FCMAE(size=size, encoder="sparse", in_chans=in_chans, spatial_dims=dims)
    randomize_(a)
    b = FCMAE(size=size, encoder="dense_masked", in_chans=in_chans, spatial_dims=dims)
    b.load_state_dict(a.state_dict())
    a, b = a.to(dev), b.to(dev)
    x = torch.randn(6, in_chans, *(img,) * dims, device=dev)
    mask = random_patch_mask(6, (img // 32,) * dims, ratio).to(dev)
    if dims == 3:
        size = f"{size}, {img}^3 volumes"
    la, lb = a(x, mask)[0], b(x, mask)[0]
    print(f"FCMAE loss sparse {la.item():.9g} dense-masked {lb.item():.9g}")
    la.backward()
    lb.backward()
    gb = dict(b.named_parameters())
    worst = max(rel_err(p.grad, gb[n].grad) for n, p in a.named_parameters() if p.grad is not None)
    out = [{"name": f"FCMAE loss, sparse vs dense-masked ({size}, {img}px, mask {ratio})",
            "rel_err": rel_err(la, lb), "tol": 1e-5},
           {"name": f"FCMAE every gradient, sparse vs dense-masked ({size})", "rel_err": worst, "tol": 1e-4}]
    for c in out:
        c["ok"] = c["rel_err"] < c["tol"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # exact float32, as on CPU
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    import MinkowskiEngine as ME

    from sparse_fcmae import ops

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "minkowskiengine": ME.__version__,
            "me_cuda": bool(ME.is_cuda_available()), "kernels": bool(ops.extension_available()),
            "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None}
    checks, t0 = [], time.time()
    for fn, fargs in [(check_timm, ("atto", 96)), (check_timm, ("tiny", 224)),
                      (check_dense_masked, ("atto", 128, 0.6)), (check_dense_masked, ("tiny", 224, 0.6)),
                      (check_fcmae, ("atto", 224, 0.6)),
                      # volumes (issue 15): 7^3 = 343-tap kernels, 1 and 2 channels
                      (check_dense_masked, ("atto", 64, 0.6, 3, 1)), (check_fcmae, ("femto", 64, 0.6, 3, 2))]:
        try:
            got = fn(dev, *fargs)
            checks += got if isinstance(got, list) else [got]
        except Exception as e:
            traceback.print_exc()
            checks.append({"name": f"{fn.__name__}{fargs}", "ok": False, "error": f"{type(e).__name__}: {e}"})
    for c in checks:
        print(("ok  " if c["ok"] else "FAIL"), c["name"], c.get("rel_err", c.get("error")))
    ok = all(c["ok"] for c in checks)
    result = {"info": info, "ok": ok, "seconds": round(time.time() - t0, 1), "checks": checks}
    atomic_write(args.out, lambda f: f.write(json.dumps(result, indent=2).encode()))
    print("all ok" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
