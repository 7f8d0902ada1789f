"""Empty stand-ins for the NVIDIA libraries that torch's PyPI wheel links but a GPU-less build root lacks.

Used only by benchmarks/prepare_gpu_carry.sh, inside its Ubuntu root, so that ``import torch`` works
there and extensions can be compiled against it. Each stand-in has the real library's soname and
symbol versions and defines, as ``ret`` stubs, every symbol torch's libraries import from it. Nothing
built there runs there; on the GPU machine the real libraries are found by soname.

  python gpu_carry_stubs.py [TORCH_LIB_DIR] [OUT_DIR]
"""
from __future__ import annotations

import collections
import glob
import os
import subprocess
import sys

MISSING = ["libcublas.so.13", "libcublasLt.so.13", "libcudnn.so.9", "libcufft.so.12", "libcufile.so.0",
           "libcurand.so.10", "libcusolver.so.12", "libcusparse.so.12", "libcusparseLt.so.0", "libnccl.so.2",
           "libnvrtc.so.13", "libnvshmem_host.so.3", "libcuda.so.1"]
# unversioned imports, by name prefix (first match wins); the rest go to NCCL's stand-in
PREFIXES = [("nccl", "libnccl.so.2"), ("curand", "libcurand.so.10"), ("cusparseLt", "libcusparseLt.so.0"),
            ("cuFile", "libcufile.so.0"), ("cudnn", "libcudnn.so.9"), ("nvshmem", "libnvshmem_host.so.3"),
            ("cu", "libcuda.so.1")]


def dynamic_symbols(path: str, which: str) -> list[tuple[str, str]]:
    """``(type letter, name@version)`` of ``nm -D --defined-only`` / ``--undefined-only``."""
    out = subprocess.run(["nm", "-D", which, path], capture_output=True, text=True, check=True).stdout
    return [tuple(line.split()[-2:]) for line in out.splitlines() if line.strip()]


def main() -> int:
    torch_lib = sys.argv[1] if len(sys.argv) > 1 else "/opt/venv/lib/python3.12/site-packages/torch/lib"
    out_dir = sys.argv[2] if len(sys.argv) > 2 else "/opt/stubs"
    present = glob.glob(torch_lib + "/*.so*") + glob.glob("/usr/local/cuda/lib64/lib*.so.*")
    defined = {s.split("@")[0] for p in present for _, s in dynamic_symbols(p, "--defined-only")}
    wanted: dict[str, dict[str, set]] = collections.defaultdict(lambda: collections.defaultdict(set))
    for p in glob.glob(torch_lib + "/*.so"):
        for kind, sym in dynamic_symbols(p, "--undefined-only"):
            name, _, version = sym.partition("@")
            if kind == "w" or name in defined:
                continue
            if version in MISSING:
                wanted[version][version].add(name)
            elif version == "NVSHMEM":
                wanted["libnvshmem_host.so.3"][version].add(name)
            elif not version:
                lib = next((lib for prefix, lib in PREFIXES if name.startswith(prefix)), "libnccl.so.2")
                wanted[lib][""].add(name)
            # other versions (glibc, libstdc++, ...) are the system's
    os.makedirs(out_dir, exist_ok=True)
    for lib in MISSING:
        asm, nodes = [".text"], []
        for version, names in wanted.get(lib, {}).items():
            for n in sorted(names):
                asm += [f".globl {n}", f".type {n},@function", f"{n}:", "ret"]
            if version:
                nodes.append(f"{version} {{ global: " + " ".join(f"{n};" for n in sorted(names)) + " };")
        src, vmap = os.path.join(out_dir, "stub.s"), os.path.join(out_dir, "stub.map")
        with open(src, "w") as f:
            f.write("\n".join(asm) + "\n")
        cmd = ["gcc", "-shared", "-nostdlib", "-o", os.path.join(out_dir, lib), src, f"-Wl,-soname,{lib}"]
        if nodes:
            with open(vmap, "w") as f:
                f.write("\n".join(nodes) + "\n")
            cmd.append(f"-Wl,--version-script={vmap}")
        subprocess.run(cmd, check=True)
        print(lib, {v: len(n) for v, n in wanted.get(lib, {}).items()})
    for f in ("stub.s", "stub.map"):
        if os.path.exists(os.path.join(out_dir, f)):
            os.remove(os.path.join(out_dir, f))
    return 0


if __name__ == "__main__":
    sys.exit(main())
