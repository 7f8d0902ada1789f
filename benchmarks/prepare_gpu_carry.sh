#!/usr/bin/env bash
# Prebuild, on a machine WITH network (root, no GPU needed), what benchmarks/gpu_bench.sh needs on a lent
# GPU machine without one: MinkowskiEngine with CUDA and sparse_fcmae._C with CUDA, compiled for that
# machine's Python and PyTorch. A CUDA build of MinkowskiEngine takes longer than a GPU lease can spare.
#
#   sudo bash benchmarks/prepare_gpu_carry.sh          # then carry .gpu_carry and the _C file it names
#
# The GPU image is Ubuntu 24.04 with Python 3.12 and torch 2.11.0+cu130 (KINDS.md of the device tool), so
# the build runs in an Ubuntu 24.04 root made by debootstrap (its glibc and Python), with:
#  - torch's wheel from PyPI, without the NVIDIA library wheels (not on this index). Empty stand-ins
#    with the right names and symbol versions (gpu_carry_stubs.py) let torch import for the build;
#    nothing built here runs here, and on the GPU machine the real libraries are found by soname;
#  - this machine's CUDA toolkit (nvcc 13.0), plus the cuBLAS/cuSPARSE/cuSOLVER/cuRAND/cuFFT headers
#    it lacks, from Ubuntu's nvidia-cuda-dev (CUDA 12.0; the calls ME and torch's headers use are the
#    same in 13.0).
# Output: ${CARRY_DIR:-.gpu_carry}/me-site-0.5.4-cp312-torch<ver>.tar.xz (site/: ME with debug info
# stripped; lib/: the OpenBLAS runtime), wheels/ (pytest for the GPU checks) and sparse_fcmae/_C.cpython-312-x86_64-linux-gnu.so in the tree.
# Takes about 40-60 min on 2 cores (the ME CUDA compile); each step is skipped when its output exists.
# Environment: ROOT (default /var/tmp/sparse-fcmae-noble), TORCH_VERSION (2.11.0), ARCH (9.0), MAX_JOBS (2).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
root="${ROOT:-/var/tmp/sparse-fcmae-noble}"
torch_version="${TORCH_VERSION:-2.11.0}"
arch="${ARCH:-9.0}"
carry="${CARRY_DIR:-$here/.gpu_carry}"
pip_host="${PIP:-python3 -m pip}"
log() { echo "[prepare_gpu_carry] $*"; }
[ "$(id -u)" = 0 ] || { echo "error: needs root (debootstrap, chroot)" >&2; exit 1; }
mkdir -p "$carry"

# ---- 0. pytest for the GPU checks (`pytest -m gpu --device cuda`): the GPU image has none; pure-python wheels ---
if ! ls "$carry"/wheels/pytest-*.whl >/dev/null 2>&1; then
  log "pytest wheels into $carry/wheels"
  $pip_host download -q --only-binary=:all: --python-version 3.12 --implementation py --platform any \
    -d "$carry/wheels" "pytest==$("$here/.venv/bin/python" -c 'import pytest; print(pytest.__version__)')"  # the suite's pytest
fi

# ---- 1. Ubuntu 24.04 root with Python 3.12, a compiler and OpenBLAS ----------------------------------------
if [ ! -x "$root/usr/bin/python3.12" ]; then
  command -v debootstrap >/dev/null || apt-get install -y -q debootstrap
  script=/usr/share/debootstrap/scripts/noble
  [ -e "$script" ] || script=/usr/share/debootstrap/scripts/gutsy  # older debootstrap: same recipe
  log "debootstrap Ubuntu 24.04 into $root (about 1 min)"
  debootstrap --no-check-gpg --variant=minbase --components=main,universe \
    --include=python3.12,python3.12-dev,python3.12-venv,build-essential,libopenblas-dev,ca-certificates \
    noble "$root" http://archive.ubuntu.com/ubuntu "$script"
  echo 'deb http://archive.ubuntu.com/ubuntu noble main universe multiverse' > "$root/etc/apt/sources.list"
fi
cp /etc/resolv.conf "$root/etc/resolv.conf"
mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
mountpoint -q "$root/dev" || mount --bind /dev "$root/dev"
trap 'umount "$root/proc" "$root/dev" 2>/dev/null || true' EXIT

# ---- 2. torch (no NVIDIA wheels) in a venv, offline from wheels fetched by this machine's pip -------------
if [ ! -d "$root/opt/venv/lib/python3.12/site-packages/torch" ]; then
  log "torch $torch_version for Python 3.12"
  rm -rf "$root/tmp/whl" && mkdir -p "$root/tmp/whl"
  plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  $pip_host download -q --no-deps "${plat[@]}" -d "$root/tmp/whl" "torch==$torch_version"
  $pip_host download -q "${plat[@]}" -d "$root/tmp/whl" numpy "setuptools<82" wheel ninja filelock \
    typing-extensions sympy networkx jinja2 fsspec
  chroot "$root" bash -c 'python3.12 -m venv /opt/venv && /opt/venv/bin/pip install -q --no-index --no-deps /tmp/whl/*.whl'
fi

# ---- 3. the CUDA toolkit and the library headers it lacks; stand-ins for the NVIDIA libraries --------------
cuda_src="$(readlink -f "${CUDA_HOME:-/usr/local/cuda}")"
if [ ! -x "$root/usr/local/cuda/bin/nvcc" ]; then
  log "copying the CUDA toolkit ($cuda_src)"
  mkdir -p "$root/usr/local" && cp -a "$cuda_src" "$root/usr/local/" && ln -sfn "$(basename "$cuda_src")" "$root/usr/local/cuda"
fi
if [ ! -f "$root/usr/local/cuda/include/cublas_v2.h" ]; then
  log "cuBLAS/cuSPARSE/cuSOLVER/cuRAND/cuFFT headers from Ubuntu's nvidia-cuda-dev"
  chroot "$root" bash -c 'apt-get update -q >/dev/null && cd /tmp && apt-get download -q nvidia-cuda-dev && mkdir -p cu12 && dpkg -x nvidia-cuda-dev_*.deb cu12'
  for h in "$root"/tmp/cu12/usr/include/{cublas,cusparse,cusolver,curand,cufft}*.h; do
    cp -n "$h" "$root/usr/local/cuda/include/"
  done
  rm -rf "$root"/tmp/cu12 "$root"/tmp/nvidia-cuda-dev_*.deb
fi
cp "$here/benchmarks/gpu_carry_stubs.py" "$root/tmp/"
chroot "$root" /opt/venv/bin/python /tmp/gpu_carry_stubs.py
for l in cublas cublasLt cusparse cusolver curand cufft; do  # link-time names
  ln -sf "$(ls "$root"/opt/stubs/lib$l.so.* | head -n1 | sed "s#^$root##")" "$root/usr/local/cuda/lib64/lib$l.so"
done
env_line="export LD_LIBRARY_PATH=/opt/stubs:/usr/local/cuda/lib64 CUDA_HOME=/usr/local/cuda PATH=/usr/local/cuda/bin:/opt/venv/bin:\$PATH TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=${MAX_JOBS:-2}"

# ---- 4. MinkowskiEngine with CUDA (skipped when the carry already holds its archive, e.g. ../shared/gpu_carry) --
rm -rf "$root/src" && mkdir -p "$root/src" && (cd "$here" && git ls-files -z | xargs -0 cp --parents -t "$root/src")
me_dir="$root/tmp/mebuild/MinkowskiEngine-0.5.4"
have_me=$(ls "$carry"/me-site-*-cp312-torch"$torch_version"*.tar.xz 2>/dev/null | head -n1 || true)
if [ -n "$have_me" ]; then
  log "MinkowskiEngine: using $(basename "$have_me") (delete it to rebuild)"
elif ! ls "$root"/tmp/mebuild/dist/*.whl >/dev/null 2>&1; then
  if [ ! -d "$me_dir" ]; then
    mkdir -p "$root/tmp/mebuild"
    # the sdist's metadata step needs a python with torch: the project's environment
    PYTHON="${PYTHON:-$here/.venv/bin/python}" bash "$here/scripts/fetch_minkowski.sh" "$root/tmp/mebuild/dl" 0.5.4
    tar -xzf "$root"/tmp/mebuild/dl/*.tar.gz -C "$root/tmp/mebuild"
    chroot "$root" /opt/venv/bin/python /src/scripts/patch_minkowski.py /tmp/mebuild/MinkowskiEngine-0.5.4 --cuda
  fi
  log "compiling MinkowskiEngine with CUDA for sm_${arch/./} (40+ min on 2 cores)"
  chroot "$root" bash -c "$env_line; cd /tmp/mebuild/MinkowskiEngine-0.5.4 && python setup.py -q bdist_wheel -d /tmp/mebuild/dist --blas=openblas --blas_include_dirs=/usr/include/x86_64-linux-gnu/openblas-pthread --force_cuda"
fi

# ---- 5. sparse_fcmae._C with CUDA ------------------------------------------------------------------------------
log "compiling sparse_fcmae._C with CUDA"
chroot "$root" bash -c "$env_line FORCE_CUDA=1; cd /src && python setup.py -q build_ext --inplace"
cp "$root"/src/sparse_fcmae/_C.cpython-312-x86_64-linux-gnu.so "$here/sparse_fcmae/"
strip --strip-debug "$here/sparse_fcmae/_C.cpython-312-x86_64-linux-gnu.so"

# ---- 6. pack ME as a site folder (debug info stripped) with the OpenBLAS runtime, in one xz archive ------------
if [ -n "$have_me" ]; then log "done:"; ls -la "$carry" "$here"/sparse_fcmae/_C.cpython-312-*.so; exit 0; fi
tv=$(chroot "$root" bash -c "$env_line; python -c 'import torch; print(torch.__version__)'" 2>/dev/null | tail -n1)
pack="$root/tmp/pack"
rm -rf "$pack" && mkdir -p "$pack/site" "$pack/lib"
(cd "$pack/site" && python3 -m zipfile -e "$(ls "$root"/tmp/mebuild/dist/*.whl | head -n1)" .)
find "$pack/site" -name '*.so' -exec strip --strip-debug {} +
lib="$root/usr/lib/x86_64-linux-gnu"  # real files: the alternatives links point outside the root
cp -L "$lib/openblas-pthread/libopenblas.so.0" "$lib/libgfortran.so.5" "$lib/libquadmath.so.0" "$pack/lib/"
rm -f "$carry"/me-site-*.tar.xz
tar -cJf "$carry/me-site-0.5.4-cp312-torch$tv.tar.xz" -C "$pack" site lib
log "done:"; ls -la "$carry" "$here"/sparse_fcmae/_C.cpython-312-*.so
