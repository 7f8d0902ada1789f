#!/usr/bin/env bash
# System packages the build needs (Debian/Ubuntu): OpenBLAS headers and library for MinkowskiEngine,
# and, where missing (a bare CUDA base image), a C++ compiler and Python's headers and venv module.
# Installs only what is missing; used by setup_env.sh (make, CI) and the Dockerfile alike.
set -euo pipefail
py="${PYTHON:-python3}"
missing=()
if ! { [ -f /usr/include/x86_64-linux-gnu/openblas-pthread/cblas.h ] || [ -f /usr/include/openblas/cblas.h ] \
       || ls /usr/include/*/openblas-pthread/cblas.h >/dev/null 2>&1; }; then
  missing+=(libopenblas-dev)
fi
command -v g++ >/dev/null || missing+=(g++)
command -v make >/dev/null || missing+=(make)
if ! command -v "$py" >/dev/null; then
  missing+=(python3 python3-dev python3-venv python3-pip)
else
  "$py" -c "import venv, ensurepip" 2>/dev/null || missing+=(python3-venv)
  inc=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
  [ -f "$inc/Python.h" ] || missing+=(python3-dev)
fi
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "error: missing ${missing[*]} and apt-get is not available; install them by hand" >&2
  exit 1
fi
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
echo "[setup] installing ${missing[*]} (apt)"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# image builds set SPARSE_FCMAE_CLEAN_APT=1: no package lists left in the layer
[ "${SPARSE_FCMAE_CLEAN_APT:-0}" = 1 ] && $sudo rm -rf /var/lib/apt/lists/*
exit 0
