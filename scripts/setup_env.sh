#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment: pinned dependencies, MinkowskiEngine,
# then this package. Used by the Makefile, CI and the Dockerfile alike.
# Usage: scripts/setup_env.sh [VENV_DIR]   (default: .venv; VENV_DIR=system uses the current python)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$here/.venv}"
log() { echo "[setup] $*"; }

if [ "$venv" = system ]; then
  py="$(command -v python3)"
else
  if [ ! -x "$venv/bin/python" ]; then
    log "creating virtual environment in $venv"
    python3 -m venv "$venv"
  fi
  py="$venv/bin/python"
fi

# libopenblas is MinkowskiEngine's BLAS on CPU; install it where apt is available and it is missing.
bash "$here/scripts/install_system_deps.sh"

log "installing pinned Python dependencies"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q -r "$here/requirements.txt"

PYTHON="$py" bash "$here/scripts/install_minkowski.sh"
# The Dockerfile installs the dependencies in a layer of their own, before the package's code is copied.
if [ "${SPARSE_FCMAE_DEPS_ONLY:-0}" = 1 ]; then log "dependencies installed (SPARSE_FCMAE_DEPS_ONLY=1)"; exit 0; fi

log "installing sparse-fcmae (with its C++/CUDA kernels when they build)"
"$py" -m pip install -q --no-build-isolation --no-deps -e "$here"
"$py" -c "import MinkowskiEngine as ME, sparse_fcmae; print('[setup] ok: MinkowskiEngine', ME.__version__, '| sparse_fcmae', sparse_fcmae.__version__)"
