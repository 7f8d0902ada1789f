#!/usr/bin/env bash
# One prepared call for a lent GPU machine (H100/H200, torch with CUDA, nvcc, no network), < 8 min:
#   1. builds sparse_fcmae._C in place with the CUDA kernels (FORCE_CUDA=1, the card's arch),
#   2. correctness of both kernels vs the float64 references (fp32, bf16, fp16; determinism),
#   3. the kernel benchmark on GPU (fp32 and bf16; dense baseline = cuDNN, fastest layout).
# Everything lands in $OUT (default benchmarks/results/gpu): build.log, nvidia-smi.txt,
# kernel_check_cuda.json, kernels_cuda_<dtype>.json, gpu_check.log. Exit 1 if a step failed.
# Usage (repository root): OUT=/some/dir bash benchmarks/gpu_check.sh    [PYTHON=python3]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/benchmarks/results/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
t0=$SECONDS
status=0
log() { echo "[gpu_check +$((SECONDS - t0))s] $*" | tee -a "$OUT/gpu_check.log"; }
step() {  # step NAME TIMEOUT CMD...: run with a time limit, keep its output, remember failures
  local name="$1" limit="$2"
  shift 2
  log "$name"
  local rc=0
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  if [ "$rc" != 0 ]; then
    status=1
    log "error: $name failed (exit $rc$([ "$rc" = 124 ] && echo ', timed out')), last lines:"
    tail -25 "$OUT/$name.log" | tee -a "$OUT/gpu_check.log"
    return 1
  fi
  tail -40 "$OUT/$name.log"
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || log "warning: nvidia-smi failed"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no GPU'; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/gpu_check.log"
[ "${PIPESTATUS[0]}" = 0 ] || { log "error: torch sees no GPU"; exit 1; }

if [ -z "${CUDA_HOME:-}" ]; then
  for d in /usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-12; do
    [ -x "$d/bin/nvcc" ] && { export CUDA_HOME="$d"; break; }
  done
fi
export PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
arch="$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')")"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}"
log "CUDA_HOME=${CUDA_HOME:-?} arch=$TORCH_CUDA_ARCH_LIST jobs=$MAX_JOBS"

rm -f sparse_fcmae/_C*.so  # never pick up a CPU-only build that travelled along
step build 330 env FORCE_CUDA=1 "$PY" setup.py build_ext --inplace || exit 1
step import 60 "$PY" -c "import sparse_fcmae._C as C; assert C.with_cuda, 'built without CUDA'; print('with_cuda', C.with_cuda)" || exit 1

step kernel_check 150 "$PY" benchmarks/kernel_check.py --device cuda --out "$OUT/kernel_check_cuda.json"
for dt in float32 bfloat16; do
  step "bench_$dt" 120 "$PY" benchmarks/kernels.py --device cuda --dtype "$dt" --warmup 5 --repeats 30 \
    --out "$OUT/kernels_cuda_$dt.json"
done
log "done, status $status"
exit $status
