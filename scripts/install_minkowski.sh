#!/usr/bin/env bash
# Build and install MinkowskiEngine 0.5.4 (the stock source release) for the current PyTorch.
#
# The release is fetched with pip, patched by scripts/patch_minkowski.py (our own changes for
# today's Python, PyTorch and CUDA) and built into a wheel cached under
# ${SPARSE_FCMAE_CACHE:-~/.cache/sparse-fcmae}/wheels, keyed by torch version and CUDA flag, so the
# ~6 minute compile happens once per machine. The Makefile and the Dockerfile both call this file.
#
# Environment: PYTHON (interpreter to install into, default python3);
#              ME_CUDA=auto|1|0 (auto: CUDA build when torch sees a GPU; set 1 in GPU-less Docker builds);
#              MAX_JOBS (parallel compile jobs, default: number of cores).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
# Absolute path (without resolving the venv's symlink): the build runs from another directory.
case "$py" in */*) py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")" ;; *) py="$(command -v "$py")" ;; esac
me_version=0.5.4
cache="${SPARSE_FCMAE_CACHE:-$HOME/.cache/sparse-fcmae}"
log() { echo "[minkowski] $*"; }

cuda="${ME_CUDA:-auto}"
if [ "$cuda" = auto ]; then
  cuda=$("$py" -c "import torch; print(int(torch.cuda.is_available()))")
fi
torch_version=$("$py" -c "import torch; print(torch.__version__)")
if [ "$cuda" = 1 ]; then flavour=cuda; else flavour=cpu; fi
key="me${me_version}-torch${torch_version}-${flavour}"
# A CUDA build for named GPU generations (image builds) must not be reused for others.
if [ "$cuda" = 1 ] && [ -n "${TORCH_CUDA_ARCH_LIST:-}" ]; then key="$key-sm$(printf %s "$TORCH_CUDA_ARCH_LIST" | tr -c 'A-Za-z0-9.+' '_')"; fi
wheel_dir="$cache/wheels/$key"

installed=$("$py" - <<PY 2>/dev/null || true
import importlib.metadata as md
try:
    print(md.version("MinkowskiEngine"))
except md.PackageNotFoundError:
    pass
PY
)
if [ "$installed" = "$me_version" ] && "$py" -c "import MinkowskiEngine" 2>/dev/null \
   && [ "$("$py" -c "import MinkowskiEngine as ME, torch; print(int(ME.is_cuda_available()))")" = "$cuda" ]; then
  log "MinkowskiEngine $me_version ($flavour) already installed"
  exit 0
fi

whl=$(ls "$wheel_dir"/*.whl 2>/dev/null | head -n1 || true)
if [ -z "$whl" ]; then
  log "no cached wheel for $key: building from the source release (about 6 min on 2 cores CPU-only, 12+ min with CUDA)"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  if [ -n "${ME_SDIST:-}" ]; then  # a source release carried along (machines without network)
    mkdir -p "$work/dl" && cp "$ME_SDIST" "$work/dl/"
  else
    PYTHON="$py" bash "$here/scripts/fetch_minkowski.sh" "$work/dl" "$me_version"
  fi
  tar -xzf "$work"/dl/*.tar.gz -C "$work"
  src=$(ls -d "$work"/[Mm]inkowski[Ee]ngine-"$me_version")
  patch_args=()
  [ "$cuda" = 1 ] && patch_args+=(--cuda)
  "$py" "$here/scripts/patch_minkowski.py" "$src" "${patch_args[@]}"

  blas_inc="${BLAS_INCLUDE_DIR:-}"  # override: OpenBLAS unpacked outside /usr (benchmarks/gpu_bench.sh)
  [ -n "$blas_inc" ] || for d in /usr/include/x86_64-linux-gnu/openblas-pthread /usr/include/aarch64-linux-gnu/openblas-pthread /usr/include/openblas; do
    [ -f "$d/cblas.h" ] && { blas_inc="$d"; break; }
  done
  [ -n "$blas_inc" ] || { echo "error: OpenBLAS headers not found; run scripts/install_system_deps.sh" >&2; exit 1; }
  build_args=(--blas=openblas "--blas_include_dirs=$blas_inc")
  [ -n "${BLAS_LIBRARY_DIR:-}" ] && build_args+=("--blas_library_dirs=$BLAS_LIBRARY_DIR")
  if [ "$cuda" = 1 ]; then build_args+=(--force_cuda); else build_args+=(--cpu_only); fi
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  log "compiling ($flavour, $MAX_JOBS jobs)"
  start=$(date +%s)
  (cd "$src" && "$py" setup.py -q bdist_wheel -d "$work/dist" "${build_args[@]}") > "$work/build.log" 2>&1 || {
    tail -n 40 "$work/build.log" >&2
    echo "error: MinkowskiEngine build failed (log above)" >&2
    exit 1
  }
  log "compiled in $(( $(date +%s) - start )) s"
  mkdir -p "$cache/wheels"
  # Publish the cache entry atomically: a half-copied wheel must never be found by the next run.
  tmp_dir="$cache/wheels/.tmp-$key-$$"
  rm -rf "$tmp_dir"; mkdir -p "$tmp_dir"
  cp "$work"/dist/*.whl "$tmp_dir/"
  rm -rf "$wheel_dir"; mv "$tmp_dir" "$wheel_dir"
  whl=$(ls "$wheel_dir"/*.whl | head -n1)
fi
log "installing $(basename "$whl") from the cache ($wheel_dir)"
"$py" -m pip install -q --no-deps --force-reinstall "$whl"
"$py" -c "import MinkowskiEngine as ME; print('[minkowski] import ok, version', ME.__version__)"
