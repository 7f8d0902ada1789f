#!/usr/bin/env bash
# Benchmark on a lent GPU machine (H100/H200, torch 2.11+cu130, nvcc 13.0, 16 cores, no network), < 8 min.
#
#   OUT=/path/to/results bash benchmarks/gpu_bench.sh        # from the repository root
#
# 1. MinkowskiEngine with CUDA, within ME_BUDGET_S seconds (default 240): an installed one is used as is;
#    else a wheel or the source release from CARRY_DIR (default .gpu_carry, filled by
#    benchmarks/prepare_gpu_carry.sh on a machine with network) is built by scripts/install_minkowski.sh
#    with ME_CUDA=1, OpenBLAS from the carried .deb files unpacked into a private folder.
# 2. The compiled kernels of csrc/ (sparse_fcmae._C), if this tree has them, built in place (in the
#    background, during step 1; EXT_BUDGET_S, default 300).
# 3. `sparse-fcmae bench` on the GPU: tiny, batch 64, 224 px, all mask ratios, forward and train step, all
#    three variants, mask 0.6 first (the target), with a time budget so the JSON is always written.
#    If MinkowskiEngine is missing, the sparse variant is recorded as unavailable (with the
#    reason) and dense-masked vs dense still run; the JSON's settings.note says what happened to the build.
# Results: $OUT/gpu-<date>.{json,md,png}, $OUT/gpu_bench.log, $OUT/me_build.log, $OUT/ext_build.log,
#   $OUT/nvidia-smi.txt (at most 8 files: the device tool's limit).
# Environment: OUT (required), PYTHON (default python3), CARRY_DIR, ME_BUDGET_S, TOTAL_BUDGET_S (default 460),
#   BENCH_ARGS (replaces the default benchmark options), BENCH_DEVICE (default cuda; cpu for a smoke test).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:?set OUT to the results folder}"
mkdir -p "$out"
py="${PYTHON:-python3}"
carry="${CARRY_DIR:-.gpu_carry}"
me_budget="${ME_BUDGET_S:-240}"
total_budget="${TOTAL_BUDGET_S:-460}"
device="${BENCH_DEVICE:-cuda}"
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }
log() { echo "[gpu_bench $(elapsed)s] $*" | tee -a "$out/gpu_bench.log"; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

(nvidia-smi || echo "nvidia-smi not available") > "$out/nvidia-smi.txt" 2>&1
"$py" -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0), 'timm', timm.__version__)" 2>&1 | tee -a "$out/gpu_bench.log"

# ---- 0. the compiled sparse kernels (csrc/, issue 3), if this tree has them: built in place, in the ------
#      background while MinkowskiEngine compiles (16 cores; each build alone leaves most of them idle)
ext_pid=""
ext_note="no csrc/ kernels in this tree"
ext_budget="${EXT_BUDGET_S:-300}"
if [ -d csrc ] && grep -q "sparse_fcmae._C" setup.py 2>/dev/null; then
  log "building the csrc/ kernels in the background (budget ${ext_budget}s)"
  MAX_JOBS=4 timeout "$ext_budget" "$py" setup.py -q build_ext --inplace > "$out/ext_build.log" 2>&1 &
  ext_pid=$!
fi

# ---- 1. MinkowskiEngine (CUDA) within its time budget --------------------------------------------------
me_ok() { "$py" -c "import MinkowskiEngine as ME, sys; sys.exit(0 if ME.is_cuda_available() or '$device' == 'cpu' else 1)" 2>/dev/null; }
if me_ok; then
  me_note="MinkowskiEngine was already installed"
else
  sdist=$(ls "$carry"/[Mm]inkowski[Ee]ngine-0.5.4.tar.gz 2>/dev/null | head -n1 || true)
  if [ -z "$sdist" ]; then
    me_note="MinkowskiEngine not built: no source release in $carry (no network here; run benchmarks/prepare_gpu_carry.sh and carry $carry)"
  elif [ "$me_budget" -le 0 ]; then
    me_note="MinkowskiEngine not built: ME_BUDGET_S=0"
  else
    blas_env=()
    if ls "$carry"/*.deb >/dev/null 2>&1; then
      blas_root=/tmp/sparse-fcmae-blas
      for f in "$carry"/*.deb; do dpkg -x "$f" "$blas_root"; done  # private folder: never unpack into /
      inc=$(dirname "$(ls "$blas_root"/usr/include/*/openblas-pthread/cblas.h 2>/dev/null | head -n1)")
      lib=$(dirname "$(ls "$blas_root"/usr/lib/*/openblas-pthread/libopenblas.so 2>/dev/null | head -n1)")
      blas_env=(BLAS_INCLUDE_DIR="$inc" BLAS_LIBRARY_DIR="$lib")
      export LD_LIBRARY_PATH="$lib:$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
    log "building MinkowskiEngine with CUDA from $sdist (budget ${me_budget}s)"
    env "${blas_env[@]}" ME_SDIST="$sdist" ME_CUDA=1 PYTHON="$py" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      timeout "$me_budget" bash scripts/install_minkowski.sh > "$out/me_build.log" 2>&1
    rc=$?
    if [ $rc -eq 0 ] && me_ok; then
      me_note="MinkowskiEngine built with CUDA in $(elapsed)s"
    elif [ $rc -eq 124 ]; then
      me_note="MinkowskiEngine not built: the CUDA build did not finish within ${me_budget}s"
    else
      me_note="MinkowskiEngine not built: build failed (exit $rc; see me_build.log)"
    fi
  fi
fi
log "$me_note"

# ---- 2. wait for the kernels ------------------------------------------------------------------------------
if [ -n "$ext_pid" ]; then
  wait "$ext_pid"; ext_rc=$?
  if [ $ext_rc -eq 0 ] && "$py" -c "import torch, sparse_fcmae._C" 2>>"$out/ext_build.log"; then
    ext_note="kernels sparse_fcmae._C built"
  elif [ $ext_rc -eq 124 ]; then
    ext_note="kernels not built within ${ext_budget}s: the sparse variant uses the pure-torch reference ops"
  else
    ext_note="kernels not built (exit $ext_rc, see ext_build.log): the sparse variant uses the pure-torch reference ops"
  fi
fi
log "$ext_note"

# ---- 3. the benchmark: stops starting configurations at its time budget and writes what it measured ------
left=$(( total_budget - $(elapsed) ))
bench_budget=$(( left > 90 ? left - 45 : 45 ))  # leave time for the last configuration and the outputs
default_args="--sizes tiny --batch 64 --img-size 224 --mask-ratios 0.6,0,0.3,0.5,0.75,0.9 --modes forward,train --warmup 3 --steps 10"
label="gpu-$(date -u +%Y-%m-%d)"
log "sparse-fcmae bench ${BENCH_ARGS:-$default_args} (time budget ${bench_budget}s)"
# shellcheck disable=SC2086
hard_limit=$(( left > 60 ? left + 60 : 120 ))  # a safety net only: --time-budget ends the run first
timeout "$hard_limit" "$py" -m sparse_fcmae.cli bench --device "$device" --out "$out" --label "$label" \
  --no-progress --time-budget "$bench_budget" --note "gpu_bench.sh: $me_note; $ext_note" \
  ${BENCH_ARGS:-$default_args} 2>&1 | tee -a "$out/gpu_bench.log"
rc=${PIPESTATUS[0]}
log "bench exit code $rc; total $(elapsed)s"
exit "$rc"
