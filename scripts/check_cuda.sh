#!/usr/bin/env bash
# Compile every CUDA source in csrc/ to an object file with the machine's nvcc, for sm_90, with the
# same defines and flags torch's CUDAExtension uses. No GPU needed: catches CUDA breakage in CI.
# Usage: scripts/check_cuda.sh [PYTHON]   (env NVCC, CUDA_ARCH=90 to override)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${1:-${PYTHON:-python3}}"
nvcc="${NVCC:-}"
if [ -z "$nvcc" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then nvcc=/usr/local/cuda/bin/nvcc; else nvcc="$(command -v nvcc || true)"; fi
fi
[ -n "$nvcc" ] && [ -x "$nvcc" ] || { echo "error: nvcc not found (set NVCC=/path/to/nvcc)" >&2; exit 1; }
arch="${CUDA_ARCH:-90}"
cuda_home="$(cd "$(dirname "$nvcc")/.." && pwd)"

# Include dirs and defines as torch's CUDAExtension passes them (only the toolkit's CUDA headers, as in
# setup.py: a kernel that needs a header only torch's nvidia wheels ship, e.g. cusparse.h, fails here too).
mapfile -t flags < <("$py" - "$cuda_home" <<'PY'
import os, sys, sysconfig
import torch
from torch.utils import cpp_extension as ce
cuda_home = sys.argv[1]
try:
    incs = ce.include_paths(device_type="cuda")
except TypeError:  # older torch
    incs = ce.include_paths(cuda=True)
incs = [i for i in incs if os.path.isdir(i)]
incs += [os.path.join(cuda_home, "include")]
incs += [sysconfig.get_paths()["include"]]
for i in incs:
    print(f"-I{os.path.normpath(i)}")
abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
for f in ce.COMMON_NVCC_FLAGS + [f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DWITH_CUDA", "-DTORCH_EXTENSION_NAME=_C",
                                 "-DTORCH_API_INCLUDE_EXTENSION_H", "-std=c++20"]:
    print(f)
PY
)

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
shopt -s nullglob
sources=("$here"/csrc/*.cu)
[ "${#sources[@]}" -gt 0 ] || { echo "error: no .cu files in csrc/" >&2; exit 1; }
echo "[check-cuda] $("$nvcc" --version | tail -1) | sm_${arch} | ${#sources[@]} file(s)"
for src in "${sources[@]}"; do
  obj="$out/$(basename "$src").o"
  start=$SECONDS
  "$nvcc" -c "$src" -o "$obj" -O3 -Xcompiler -fPIC \
    -gencode "arch=compute_${arch},code=sm_${arch}" "${flags[@]}"
  echo "[check-cuda] ok $(basename "$src") ($((SECONDS - start)) s, $(stat -c %s "$obj") bytes)"
done
