#!/usr/bin/env bash
# Build the GPU image from the unchanged Dockerfile on a machine without a Docker daemon or access to a
# container registry (root, buildah, network to PyPI and an Ubuntu mirror), then smoke-test it.
#
#   sudo bash scripts/build_image.sh [--no-cache] [--commit REV | --context DIR] [--tag NAME] [--no-smoke]
#   (make image)
#
# 1. The base image nvidia/cuda:13.0.1-devel-ubuntu24.04 cannot be pulled here, so a stand-in is stored
#    under its exact name (docker.io/nvidia/cuda:13.0.1-devel-ubuntu24.04): an Ubuntu 24.04 minbase root
#    made by debootstrap (no Python, no compiler: scripts/install_system_deps.sh must add them, as on the
#    real image), this machine's CUDA toolkit (nvcc 13.0) under /usr/local/cuda-13.0, the CUDA 13.0
#    cuBLAS/cuSPARSE/cuSOLVER/cuRAND/cuFFT/nvJitLink headers and libraries from NVIDIA's wheels (the
#    devel image's libcublas-dev & co.), and the environment variables NVIDIA's Dockerfiles set. It is made
#    once and reused; REBUILD_BASE=1 remakes it. The real image stays what `docker build .` uses.
# 2. `buildah bud` builds the Dockerfile as it is (build arguments only), with layers and the
#    MinkowskiEngine wheel cache mount kept between builds (--no-cache rebuilds every layer but keeps the
#    cache mount: the build time "with the ME wheel cache").
# 3. scripts/smoke_image.sh runs the CLI inside the image; the build time, image size, ME cache use
#    and the smoke output go to benchmarks/results/image-build-<date>-<me-cache-miss|me-cache-hit|
#    code-change>.json (docs/docker.md; code-change: the dependency layer came from the layer cache).
#
# Environment: TORCH_CUDA_ARCH_LIST (build argument; default the Dockerfile's six architectures, hours on
# 2 cores: pass one, e.g. 9.0, for a local check), STORAGE_DRIVER (default overlay where the kernel can
# mount it, else vfs; one store keeps the driver it was made with),
# BASE_ROOT (the stand-in's root folder, default /var/tmp/sparse-fcmae-cuda-base), UBUNTU_MIRROR
# (default: debootstrap's own), PIP (the pip that fetches the CUDA library wheels, default python3 -m pip).
set -euo pipefail
# (one function: bash parses it whole before running, so the file may change during a long build)
main() {
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
base_name=docker.io/nvidia/cuda:13.0.1-devel-ubuntu24.04
tag=sparse-fcmae:latest
context="$here"
no_cache=()
commit=""
smoke=1
while [ $# -gt 0 ]; do
  case "$1" in
    --no-cache) no_cache=(--no-cache) ;;
    --context) [ $# -ge 2 ] || { echo "error: --context needs a folder" >&2; exit 2; }; context="$2"; shift ;;
    --tag) [ $# -ge 2 ] || { echo "error: --tag needs a name" >&2; exit 2; }; tag="$2"; shift ;;
    --commit) [ $# -ge 2 ] || { echo "error: --commit needs a revision" >&2; exit 2; }; commit="$2"; shift ;;
    --no-smoke) smoke=0 ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "$commit" ]; then  # the committed tree only, as a fresh clone has it (edits during the build do not leak in)
  rev=$(git -C "$here" rev-parse --verify -q "$commit^{commit}") || { echo "error: no such commit: $commit" >&2; exit 2; }
  commit="$rev"
  context="/var/tmp/sparse-fcmae-context-$commit"
  rm -rf "$context" && mkdir -p "$context"
  trap 'rm -rf "$context"' EXIT
  git -C "$here" archive "$commit" | tar -x -C "$context"
fi
[ -f "$context/Dockerfile" ] || { echo "error: no Dockerfile in $context" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "error: needs root (debootstrap, chroot, buildah with --isolation chroot)" >&2; exit 1; }
# overlay where the kernel allows it: vfs stores every layer as a full copy (~45 GB for this image)
overlay_ok() {
  local t; t="$(mktemp -d)"; mkdir -p "$t"/{l,u,w,m}
  mount -t overlay overlay -o "lowerdir=$t/l,upperdir=$t/u,workdir=$t/w" "$t/m" 2>/dev/null && umount "$t/m"
  local rc=$?; rm -rf "$t"; return $rc
}
driver="${STORAGE_DRIVER:-}"
[ -n "$driver" ] || { if overlay_ok; then driver=overlay; else driver=vfs; fi; }
root="${BASE_ROOT:-/var/tmp/sparse-fcmae-cuda-base}"
pip_host="${PIP:-python3 -m pip}"
cuda_src="$(readlink -f "${CUDA_HOME:-/usr/local/cuda}")"
log() { echo "[build_image] $*"; }
bah() { buildah --storage-driver "$driver" "$@"; }
for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || { log "installing $tool"; apt-get install -y -q "$tool" >/dev/null; }
done

# ---- 1. the stand-in base image ---------------------------------------------------------------------------
make_root() {
  [ -x "$cuda_src/bin/nvcc" ] || { echo "error: no CUDA toolkit at $cuda_src (set CUDA_HOME)" >&2; exit 1; }
  if [ ! -x "$root/usr/bin/apt-get" ]; then
    rm -rf "$root"
    # Debian's debootstrap may lack a 'noble' script; 'gutsy' is the same recipe for every Ubuntu release.
    # A private copy with the alias keeps the mirror debootstrap picks itself (or UBUNTU_MIRROR).
    dbs="$(mktemp -d)"
    cp -a /usr/share/debootstrap/. "$dbs/"
    [ -e "$dbs/scripts/noble" ] || ln -s gutsy "$dbs/scripts/noble"
    gpg=(--no-check-gpg)  # the host (Debian) has no Ubuntu archive keyring; apt in the image checks it
    [ -f /usr/share/keyrings/ubuntu-archive-keyring.gpg ] && gpg=(--keyring=/usr/share/keyrings/ubuntu-archive-keyring.gpg)
    log "debootstrap Ubuntu 24.04 (minbase) into $root"
    DEBOOTSTRAP_DIR="$dbs" debootstrap "${gpg[@]}" --variant=minbase --components=main,universe \
      --include=ca-certificates noble "$root" ${UBUNTU_MIRROR:+"$UBUNTU_MIRROR"}
    rm -rf "$dbs"
  fi
  # apt sources as the ubuntu:24.04 image has them (deb822), on the mirror debootstrap used
  mirror=$(awk '$1 == "deb" {print $2; exit}' "$root/etc/apt/sources.list" 2>/dev/null || true)
  [ -n "$mirror" ] || mirror=$(awk '$1 == "URIs:" {print $2; exit}' "$root/etc/apt/sources.list.d/ubuntu.sources")
  cat > "$root/etc/apt/sources.list.d/ubuntu.sources" <<EOF
Types: deb
URIs: $mirror
Suites: noble noble-updates noble-backports noble-security
Components: main restricted universe multiverse
Signed-By: /usr/share/keyrings/ubuntu-archive-keyring.gpg
EOF
  rm -f "$root/etc/apt/sources.list"

  if [ ! -x "$root/usr/local/cuda/bin/nvcc" ]; then
    log "copying the CUDA toolkit ($cuda_src)"
    mkdir -p "$root/usr/local"
    cp -a "$cuda_src" "$root/usr/local/cuda-13.0"
    ln -sfn cuda-13.0 "$root/usr/local/cuda"
  fi
  if [ ! -f "$root/usr/local/cuda/include/cublas_v2.h" ]; then
    # the newest CUDA 13.0 update the index holds (13.0.3 here: the versions torch 2.14.1 pins)
    log "CUDA 13.0 math libraries (NVIDIA's wheels: the devel image's lib*-dev packages)"
    whl="$(mktemp -d)"
    plat=()
    for t in manylinux_2_{34,28,27,25,24,18,17,12,5}_x86_64 manylinux{2014,2010,1}_x86_64; do plat+=(--platform "$t"); done
    $pip_host download -q --only-binary=:all: "${plat[@]}" --python-version 3.12 -d "$whl" \
      "cuda-toolkit[cublas,cusparse,cusolver,curand,cufft,nvjitlink]==13.0.*"
    for w in "$whl"/nvidia_*.whl; do
      python3 -m zipfile -e "$w" "$whl/x"
    done
    cp -a "$whl"/x/nvidia/cu13/include/. "$root/usr/local/cuda/include/"
    cp -a "$whl"/x/nvidia/cu13/lib/. "$root/usr/local/cuda/lib64/"
    rm -rf "$whl"
    # link-time names (lib*.so), as the -dev packages install them
    (cd "$root/usr/local/cuda/lib64" && for f in lib*.so.[0-9]*; do
       n="${f%%.so.*}.so"; [ -e "$n" ] || ln -s "$f" "$n"; done)
  fi
  echo /usr/local/cuda/lib64 > "$root/etc/ld.so.conf.d/000_cuda.conf"
  printf '/usr/local/nvidia/lib\n/usr/local/nvidia/lib64\n' > "$root/etc/ld.so.conf.d/nvidia.conf"
  chroot "$root" ldconfig
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb "$root"/tmp/*
}

if [ "${REBUILD_BASE:-0}" = 1 ] || ! bah images -q "$base_name" >/dev/null 2>&1; then
  make_root
  log "storing the stand-in as $base_name"
  bah rmi -f "$base_name" >/dev/null 2>&1 || true
  ctr=$(bah from scratch)
  mnt=$(bah mount "$ctr")
  cp -a "$root"/. "$mnt"/
  bah umount "$ctr" >/dev/null
  # The ENV of nvidia/cuda's base, runtime and devel Dockerfiles for 13.0.1 (ubuntu2404); the real image
  # does not set CUDA_HOME (torch finds /usr/local/cuda by itself).
  bah config \
    --env NVARCH=x86_64 \
    --env NVIDIA_REQUIRE_CUDA="cuda>=13.0" \
    --env NV_CUDA_CUDART_VERSION=13.0.88-1 \
    --env CUDA_VERSION=13.0.1 \
    --env NV_CUDA_LIB_VERSION=13.0.1-1 \
    --env PATH=/usr/local/nvidia/bin:/usr/local/cuda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LD_LIBRARY_PATH=/usr/local/nvidia/lib:/usr/local/nvidia/lib64 \
    --env LIBRARY_PATH=/usr/local/cuda/lib64/stubs \
    --env NVIDIA_VISIBLE_DEVICES=all \
    --env NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    --env NVIDIA_PRODUCT_NAME=CUDA \
    --label maintainer="sparse-fcmae stand-in for NVIDIA's image (scripts/build_image.sh)" \
    --label org.opencontainers.image.description="local stand-in: Ubuntu 24.04 + this machine's CUDA 13.0 toolkit" \
    --cmd /bin/bash "$ctr"
  bah commit -q "$ctr" "$base_name" >/dev/null
  bah rm "$ctr" >/dev/null
fi
log "base: $base_name ($(bah images --format '{{.Size}}' "$base_name" | head -n1))"

# ---- 2. the image ------------------------------------------------------------------------------------------
# pip in the build uses this machine's pip configuration (its indexes and wheel folders, CA bundle,
# constraints): read-only mounts for the RUN steps, never part of a layer. Docker users need none of it.
pip_mounts=()
mount_ro() {  # once per destination
  local m="$1:${2:-$1}:ro"
  [ -e "$1" ] && [[ " ${pip_mounts[*]} " != *" $m "* ]] && pip_mounts+=(-v "$m")
  return 0
}
user_conf="${XDG_CONFIG_HOME:-$HOME/.config}/pip/pip.conf"
confs=()
for f in /etc/pip.conf /etc/xdg/pip/pip.conf "$user_conf" "$HOME/.pip/pip.conf" ${PIP_CONFIG_FILE:-}; do
  [ -f "$f" ] && confs+=("$f")
done
for f in "${confs[@]}"; do
  case "$f" in
    "$user_conf") mount_ro "$f" /root/.config/pip/pip.conf ;;  # the build runs as root
    "$HOME/.pip/pip.conf") mount_ro "$f" /root/.pip/pip.conf ;;
    *) mount_ro "$f" ;;
  esac
  # local paths the configuration names (file:// indexes, find-links folders, constraints, cert)
  for p in $(sed -n 's/^[[:space:]]*[a-z-]*[[:space:]]*=//p' "$f" | tr ' ' '\n' | sed -n 's#^file://##; \#^/#p'); do
    mount_ro "${p%/simple}"
  done
done
results="$here/benchmarks/results"
mkdir -p "$results" "$here/runs"
build_log="$here/runs/image-build.log"
build_args=()
[ -n "${TORCH_CUDA_ARCH_LIST:-}" ] && build_args+=(--build-arg "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST")
log "buildah bud -t $tag ${build_args[*]} ${no_cache[*]} ${pip_mounts[*]} $context (log: $build_log)"
start=$(date +%s)
set +e
bah bud --isolation chroot --layers --pull=never "${no_cache[@]}" "${build_args[@]}" "${pip_mounts[@]}" -t "$tag" "$context" 2>&1 \
  | while IFS= read -r line; do printf '%s %s\n' "$(date +%T)" "$line"; done | tee "$build_log"
rc=${PIPESTATUS[0]}
set -e
build_s=$(( $(date +%s) - start ))
[ "$rc" = 0 ] || { echo "error: the image build failed after ${build_s} s (log: $build_log)" >&2; exit "$rc"; }
log "built $tag in ${build_s} s"

# ---- 3. smoke test and the result file ---------------------------------------------------------------------
smoke_log="$here/runs/image-smoke.log"
: > "$smoke_log"
smoke_rc=skipped
if [ "$smoke" = 1 ]; then
  set +e
  STORAGE_DRIVER="$driver" bash "$here/scripts/smoke_image.sh" "$tag" 2>&1 | tee "$smoke_log"
  smoke_rc=${PIPESTATUS[0]}
  set -e
fi
python3 - "$results" "$build_log" "$smoke_log" "$tag" "$build_s" "${no_cache[*]:-}" "${TORCH_CUDA_ARCH_LIST:-}" "$driver" "$commit" "$smoke_rc" <<'PY'
import datetime, json, pathlib, re, shutil, subprocess, sys

results, build_log, smoke_log, tag, build_s, no_cache, arch, driver, commit, smoke_rc = sys.argv[1:]
here = pathlib.Path(results).parents[1]
log = pathlib.Path(build_log).read_text(errors="replace")
git = lambda *a: subprocess.run(["git", "-C", str(here), *a], capture_output=True, text=True).stdout.strip()
compiled = re.search(r"\[minkowski\] compiled in (\d+) s", log)
cached = "[minkowski] installing" in log and not compiled
bah = ["buildah", "--storage-driver", driver]
size = subprocess.run([*bah, "images", "--format", "{{.Size}}", tag], capture_output=True, text=True).stdout.split("\n")[0]
# exact bytes from podman where it is installed (it reads the same store; buildah prints only rounded sizes)
pod = subprocess.run(["podman", "--storage-driver", driver, "image", "inspect", "--format", "{{.Size}}", tag],
                     capture_output=True, text=True) if shutil.which("podman") else None
size_bytes = int(pod.stdout) if pod and pod.returncode == 0 and pod.stdout.strip().isdigit() else None
steps = [ln for ln in log.splitlines() if re.search(r"STEP \d+/\d+", ln)]
record = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "commit": commit or git("rev-parse", "HEAD"),
    "context": f"git archive {commit}" if commit else "working tree" + (" (uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""),
    "image": tag,
    "base": "docker.io/nvidia/cuda:13.0.1-devel-ubuntu24.04 (local stand-in, scripts/build_image.sh)",
    "builder": subprocess.run(["buildah", "--version"], capture_output=True, text=True).stdout.strip(),
    "storage_driver": driver,
    "build_args": {"TORCH_CUDA_ARCH_LIST": arch or "(Dockerfile default)"},
    "layer_cache": "off (--no-cache)" if no_cache else "on",
    # hit/miss: the dependency layer ran and found the wheel in the cache mount or compiled it; "layer":
    # that layer came from the layer cache (a code change rebuilds only the package's kernels)
    "me_wheel_cache": "hit" if cached else ("miss" if compiled else "layer"),
    "me_compile_s": int(compiled.group(1)) if compiled else None,
    "build_s": int(build_s),
    "cpus": len(__import__("os").sched_getaffinity(0)),
    "image_size": size or None,
    "base_size": subprocess.run([*bah, "images", "--format", "{{.Size}}", "docker.io/nvidia/cuda:13.0.1-devel-ubuntu24.04"],
                                capture_output=True, text=True).stdout.split("\n")[0] or None,
    "image_size_bytes": size_bytes,
    "steps": steps,
    "steps_from_layer_cache": log.count("--> Using cache"),
    "build_log_tail": log.splitlines()[-15:],
    "smoke_ok": smoke_rc == "0" if smoke_rc != "skipped" else None,
    "smoke": pathlib.Path(smoke_log).read_text(errors="replace").splitlines(),
}
day = datetime.date.today().isoformat()
scenario = {"layer": "code-change"}.get(record["me_wheel_cache"], f"me-cache-{record['me_wheel_cache']}")
out = pathlib.Path(results) / f"image-build-{day}-{scenario}.json"
out.write_text(json.dumps(record, indent=1) + "\n")
print(f"[build_image] wrote {out.relative_to(here)}")
PY
# the result file is written either way; a failed smoke test still fails the command
[ "$smoke_rc" = 0 ] || [ "$smoke_rc" = skipped ] || { echo "error: the smoke test failed (output above, $smoke_log)" >&2; exit 1; }
}
main "$@"; exit  # on one line: bash reads no further in this file, which may have changed
