#!/usr/bin/env bash
# Everything that needs a GPU, as one prepared call for a lent GPU machine (H100/H200, torch with CUDA,
# nvcc, 16 cores, no network), in under 9 minutes:
#
#   OUT=/path/to/results bash benchmarks/gpu_bench.sh        # from the repository root
#
# 1. MinkowskiEngine with CUDA: an installed one; else a prebuilt one from CARRY_DIR (default
#    .gpu_carry, made by benchmarks/prepare_gpu_carry.sh on a machine with network: a site folder
#    archive built for that machine's python and torch, plus the OpenBLAS runtime: a CUDA build of ME
#    takes longer than a lease can spare). Without it the sparse variant is recorded as unavailable.
# 2. The compiled kernels (sparse_fcmae._C with CUDA): a carried build, else built here.
# 3. Correctness before timing: `pytest -m gpu --device cuda` (the suite's oracle checks on the GPU: sparse vs
#    dense-masked vs timm vs the CPU result, the CUDA kernels vs float64 references, GPU memory flat over 300 steps).
#    Should the vectorised depthwise kernels fail theirs, the rest runs with the scalar ones (SPARSE_FCMAE_CUDA_DW=1).
# 4. The kernel benchmark (fp32; both sets of CUDA depthwise kernels side by side) and `sparse-fcmae bench` (tiny, batch 64, 224 px): the baseline search at
#    the target row in fp32 and bf16 (every dense configuration: layout x eager/compiled), then, as time
#    allows, the eager mask sweep (see section 4).
# 5. benchmarks/gpu_profile.py: where the sparse and dense-masked training steps spend their time (bf16).
# Results in $OUT (the device tool returns at most 8 files): gpu_bench.log (everything printed, the profile's
#   text report included), gpu_tests.json, kernels_cuda_float32.json,
#   gpu-search-fp32-<date>.json, gpu-search-bf16-<date>.json, gpu-cudagraphs-bf16-<date>.json,
#   gpu-graph-eager-bf16-<date>.json, gpu-sweep-fp32-<date>.json (skip one: eight files come back at most).
# Rehearsal on a machine without a GPU: GPU_BENCH_DEVICE=cpu runs the same steps on the CPU (MinkowskiEngine and the
#   kernels as installed, never rebuilt), with SEARCH_ARGS etc. set small (tests/test_gpu_bench.py does this): a
#   broken step shows here, not in a lease's minutes.
# Environment: OUT (required), PYTHON (default python3), CARRY_DIR, GPU_BENCH_DEVICE (cuda; cpu: the rehearsal),
#   KERNELS_ARGS (benchmarks/kernels.py options),
#   TOTAL_BUDGET_S (default 520), SEARCH_ARGS / SWEEP_ARGS (replace the benchmark options), VOL3D_S / VOL3D_ARGS
#   (opt-in: seconds for, and options of, a bench --spatial-dims 3 run before the sweep), SKIP (space-separated
#   steps to leave out of a rerun: equivalence kernels search_fp32 search_bf16 cudagraphs graph_eager sweep profile),
#   GRAPH_EAGER_ARGS (its options), PROFILE_RESERVE_S
#   (seconds kept for the profile, default 90), FP32_SHARE_PCT (the fp32 search's share of the time left,
#   default 45), PROFILE_ARGS (gpu_profile.py options, default bf16 with
#   the host time by Python call site).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:?set OUT to the results folder}"
mkdir -p "$out"
py="${PYTHON:-python3}"
carry="${CARRY_DIR:-.gpu_carry}"
total_budget="${TOTAL_BUDGET_S:-520}"
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }
logf="$out/gpu_bench.log"
log() { echo "[gpu_bench $(elapsed)s] $*" | tee -a "$logf"; }
run() {  # run NAME LIMIT CMD...: output into the log, failures noted, never fatal
  local name="$1" limit="$2" rc=0
  shift 2
  log "$name (limit ${limit}s)"
  timeout "$limit" "$@" >> "$logf" 2>&1 || rc=$?
  [ "$rc" = 0 ] || log "error: $name failed (exit $rc$([ "$rc" = 124 ] && echo ', timed out'))"
  return "$rc"
}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
dev="${GPU_BENCH_DEVICE:-cuda}"
case "$dev" in cuda|cpu) ;; *) echo "gpu_bench.sh: GPU_BENCH_DEVICE must be cuda or cpu, got '$dev'" >&2; exit 2;; esac
export PYTHONUNBUFFERED=1
skip=" ${SKIP:-} "
wanted() { [[ "$skip" != *" $1 "* ]]; }

(nvidia-smi || echo "nvidia-smi not available") >> "$logf" 2>&1
"$py" -c "import torch, timm, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0), 'timm', timm.__version__)" 2>&1 | tee -a "$logf"

# ---- 1. MinkowskiEngine with CUDA -------------------------------------------------------------------------
me_ok() { "$py" -c "import MinkowskiEngine as ME, sys; sys.exit(0 if '$dev' == 'cpu' or ME.is_cuda_available() else 1)" >> "$logf" 2>&1; }
pytag=$("$py" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
torchv=$("$py" -c "import torch; print(torch.__version__)")
if me_ok; then
  me_note="MinkowskiEngine was already installed"
elif site=$(ls "$carry"/me-site-*-"$pytag"-torch"$torchv".tar.xz 2>/dev/null | head -n1) && [ -n "$site" ] \
  || { site=$(ls "$carry"/me-site-*-"$pytag"-torch*.tar.xz 2>/dev/null | head -n1) && [ -n "$site" ] \
       && log "warning: no prebuilt MinkowskiEngine for torch $torchv; trying $(basename "$site")"; }; then
  me_root=/tmp/sparse-fcmae-me  # site/ (the package) and lib/ (OpenBLAS): a private folder, never /
  mkdir -p "$me_root" && tar -xJf "$site" -C "$me_root"
  export PYTHONPATH="$PYTHONPATH:$me_root/site"
  export LD_LIBRARY_PATH="$me_root/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  if me_ok; then me_note="MinkowskiEngine with CUDA: prebuilt $(basename "$site")"
  else me_note="MinkowskiEngine: the prebuilt $(basename "$site") does not import with CUDA (see the log)"; fi
else
  me_note="MinkowskiEngine not available: nothing for $pytag torch $torchv in $carry (run benchmarks/prepare_gpu_carry.sh)"
fi
log "$me_note"

# ---- 2. the compiled kernels ---------------------------------------------------------------------------------
ext_ok() { "$py" -c "import torch, sparse_fcmae._C as C, sys; sys.exit(0 if '$dev' == 'cpu' or C.with_cuda else 1)" >> "$logf" 2>&1; }
if ext_ok; then
  ext_note="kernels sparse_fcmae._C with CUDA (carried build)"
  [ "$dev" = cpu ] && ext_note="rehearsal on the CPU: kernels sparse_fcmae._C as built here"
elif [ "$dev" = cpu ]; then
  ext_note="rehearsal on the CPU: no kernels built (the sparse variant uses the pure-torch reference ops)"
else
  rm -f sparse_fcmae/_C*.so
  arch=$("$py" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')")
  TORCH_CUDA_ARCH_LIST="$arch" FORCE_CUDA=1 MAX_JOBS="$(nproc)" run build_kernels 300 "$py" setup.py build_ext --inplace
  if ext_ok; then ext_note="kernels sparse_fcmae._C built here with CUDA"
  else ext_note="kernels not built: the sparse variant uses the pure-torch reference ops"; fi
fi
log "$ext_note"

# ---- 3. correctness on the GPU, before any timing: the test suite's oracle checks (marked gpu) on CUDA ---------
# pytest from the carried wheels where the image has none (pure-python wheels, unpacked: no pip, no network)
if ! "$py" -c "import pytest" >> "$logf" 2>&1 && ls "$carry"/wheels/*.whl > /dev/null 2>&1; then
  "$py" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall('/tmp/sparse-fcmae-wheels') for w in sys.argv[1:]]" \
    "$carry"/wheels/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/sparse-fcmae-wheels"
fi
if wanted equivalence && me_ok; then
  # only the files holding gpu checks: the others import what the GPU image lacks (hydra, wandb, scikit-learn)
  # shellcheck disable=SC2046
  run gpu_tests 240 "$py" -m pytest -q -m gpu --device "$dev" -p no:cacheprovider -p no:hydra_pytest \
    --results-json "$out/gpu_tests.json" $(grep -l "pytest.mark.gpu" tests/test_*.py)
  # the vectorised CUDA depthwise kernels (variant 2, the default) failing their oracle check: time the scalar
  # ones instead (SPARSE_FCMAE_CUDA_DW=1), so the benchmarks below measure kernels that were found correct
  # checked ID...: some test whose id holds one of the IDs ran, and all such passed
  checked() {
    "$py" -c "import json, sys; t = [o for o in json.load(open(sys.argv[1]))['tests'] if any(i in o['test'] for i in sys.argv[2:])]; sys.exit(not t or any(o['outcome'] != 'passed' for o in t))" "$out/gpu_tests.json" "$@" >> "$logf" 2>&1
  }
  if checked dw2 dw3; then
    log "the vectorised CUDA depthwise kernels passed their checks"
  else
    export SPARSE_FCMAE_CUDA_DW=1
    log "warning: the vectorised CUDA depthwise kernels failed (or were not checked); benchmarking the scalar ones"
  fi
  # the same for the fused CUDA GRN kernels (variant 2): the separate ones (SPARSE_FCMAE_CUDA_GRN=1) if they fail
  if checked grn2; then
    log "the fused CUDA GRN kernels passed their checks"
  else
    export SPARSE_FCMAE_CUDA_GRN=1
    log "warning: the fused CUDA GRN kernels failed (or were not checked); benchmarking the separate ones"
  fi
fi
if wanted kernels && ext_ok; then
  # shellcheck disable=SC2086
  run kernel_bench 60 "$py" benchmarks/kernels.py --device "$dev" --dtype float32 \
    ${KERNELS_ARGS:---batch 64 --warmup 5 --repeats 20 --skip-slow} --out "$out/kernels_${dev}_float32.json"
fi

# ---- 4. the benchmark -------------------------------------------------------------------------------------------
# a) the baseline search at the target row (training step, mask 0.6), fp32 then bf16: the sparse step beside
#    every dense configuration (layouts nchw / channels_last, eager / torch.compile; cudnn.benchmark on);
# b) what time is left: the eager mask sweep and the forward pass (fp32).
# Each with a time budget (--time-budget stops starting rows; `timeout` is the safety net), so its JSON is
# always written. Markdown and PNG are rendered later with `sparse-fcmae bench --from-json`.
# 2026-11-27 found compiled dense masking the strongest baseline (NCHW = channels_last once compiled) and the
# sparse step host-bound in bf16: the default search pits the compiled sparse step against it (the encoder's graph
# path: the whole step one graph, no MinkowskiEngine object, no host sync; since ad3786d, before that each stage
# compiled alone), then (step "cudagraphs") the same replayed as CUDA graphs (mode reduce-overhead) in bf16.
search_args="${SEARCH_ARGS:---sizes tiny --batch 64 --img-size 224 --mask-ratios 0.6 --modes train --layouts nchw --executions eager,compiled --sparse-compile --warmup 3 --steps 10}"
graphs_args="${GRAPHS_ARGS:---sizes tiny --batch 64 --img-size 224 --mask-ratios 0.6 --modes train --variants sparse,dense_masked --layouts nchw --executions compiled --sparse-compile reduce-overhead --warmup 3 --steps 10}"
# step "graph_eager": the graph path run eagerly (bf16) against the same baseline; on CPU it beat both the
# MinkowskiEngine path and the compiled step (2026-11-28, docs/benchmarks.md)
graph_eager_args="${GRAPH_EAGER_ARGS:---sizes tiny --batch 64 --img-size 224 --mask-ratios 0.6 --modes train --variants sparse,dense_masked --layouts nchw --executions compiled --sparse-graph --warmup 3 --steps 10}"
sweep_args="${SWEEP_ARGS:---sizes tiny --batch 64 --img-size 224 --mask-ratios 0,0.3,0.5,0.75,0.9 --modes forward,train --layouts nchw,channels_last --executions eager --warmup 2 --steps 6}"
day=$(date -u +%Y-%m-%d)
rc=0
reserve=$(wanted profile && echo "${PROFILE_RESERVE_S:-90}" || echo 0)
bench() {  # bench LABEL SHARE_S PRECISION ARGS...
  local label="$1" share="$2" precision="$3"
  shift 3
  if [ "$share" -lt 30 ]; then log "no time left for $label"; return 0; fi
  # shellcheck disable=SC2068
  run "$label" $(( share + 90 )) "$py" -m sparse_fcmae.cli bench --device "$dev" --out "$out" \
    --label "$label" --precision "$precision" --no-progress --time-budget "$(( share - 20 > 15 ? share - 20 : 15 ))" \
    --note "gpu_bench.sh: $me_note; $ext_note" $@ || rc=1
  rm -f "$out/$label.md" "$out/$label.png"  # re-rendered from the JSON: the tool returns at most 8 files
}
wanted_of() {  # how many of the steps named still want time
  local n=0 s
  for s in "$@"; do wanted "$s" && n=$(( n + 1 )); done
  echo "$n"
}
later() { wanted_of cudagraphs graph_eager sweep; }  # the steps after the search share what it leaves
for precision in fp32 bf16; do
  wanted "search_$precision" || continue
  left=$(( total_budget - $(elapsed) - reserve ))
  # fp32 takes FP32_SHARE_PCT of what is left; bf16 the rest, less a quarter per later step
  if [ "$precision" = fp32 ]; then share=$(( left * ${FP32_SHARE_PCT:-45} / 100 ))
  else share=$(( left * (4 - $(later)) / 4 - 10 )); fi
  # shellcheck disable=SC2086
  bench "gpu-search-$precision-$day" "$share" "$precision" $search_args
done
if wanted cudagraphs; then
  left=$(( total_budget - $(elapsed) - reserve - ${VOL3D_S:-0} ))  # the 3D run (below) keeps its seconds
  share=$(( left / $(wanted_of cudagraphs graph_eager sweep) - 10 ))
  # shellcheck disable=SC2086
  bench "gpu-cudagraphs-bf16-$day" "$share" bf16 $graphs_args
fi
if wanted graph_eager; then
  left=$(( total_budget - $(elapsed) - reserve - ${VOL3D_S:-0} ))
  share=$(( left / $(wanted_of graph_eager sweep) - 10 ))
  # shellcheck disable=SC2086
  bench "gpu-graph-eager-bf16-$day" "$share" bf16 $graph_eager_args
fi
# volumes (issue 15 item 6), opt-in: VOL3D_S=<seconds> runs bench --spatial-dims 3 first, from the sweep's share
# (VOL3D_ARGS replaces its options; the memory fit, --mem-budget-gb, has no time budget of its own: run it alone)
vol3d_args="${VOL3D_ARGS:---sizes femto --batch 2 --img-size 64,128 --mask-ratios 0.6,0.75 --modes train --layouts nchw,channels_last --executions eager,compiled --warmup 2 --steps 6}"
if [ -n "${VOL3D_S:-}" ]; then
  # shellcheck disable=SC2086
  bench "gpu-3d-fp32-$day" "$VOL3D_S" fp32 --spatial-dims 3 $vol3d_args
fi
if wanted sweep; then
  # shellcheck disable=SC2086
  bench "gpu-sweep-fp32-$day" $(( total_budget - $(elapsed) - reserve )) fp32 $sweep_args
fi
# ---- 5. the profile of one training step, sparse vs dense-masked (bf16: where the host time goes) -------------
# no batch sweep by default: each batch size recompiles the step, and 2026-11-28 ran out of its 100 s on it
if wanted profile && me_ok; then
  # shellcheck disable=SC2086
  run gpu_profile $(( reserve + 30 )) "$py" benchmarks/gpu_profile.py --device "$dev" --out "$out/gpu_profile.txt" \
    ${PROFILE_ARGS:---precision bf16 --with-stack --sparse-compile --sweep=} || rc=1
  rm -f "$out/gpu_profile.txt" "$out/gpu_profile.json"  # its text is in the log already (8 files at most come back)
fi
log "done in $(elapsed)s"
exit "$rc"
