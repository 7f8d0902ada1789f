#!/usr/bin/env bash
# Gather, on a machine WITH network, what benchmarks/gpu_bench.sh needs on a GPU machine without one:
# the MinkowskiEngine 0.5.4 source release and the OpenBLAS headers/libraries (Debian packages; they are
# unpacked into a private folder there, never into /). Writes into ${1:-.gpu_carry} (ignored by git);
# send that folder along with the repository (the device tool's `carry`).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$here/.gpu_carry}"
py="${PYTHON:-python3}"
mkdir -p "$dest"
dest="$(cd "$dest" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if ! ls "$dest"/[Mm]inkowski[Ee]ngine-0.5.4.tar.gz >/dev/null 2>&1; then
  # As scripts/install_minkowski.sh: pip runs the sdist's setup.py, which needs torch and asks
  # numpy.distutils (gone from numpy 2) for BLAS; a sitecustomize stub answers for that one step.
  mkdir -p "$work/stub"
  cat > "$work/stub/sitecustomize.py" <<'STUB'
import sys, types
info = types.ModuleType("numpy.distutils.system_info")
info.get_info = lambda name, *a, **k: {"libraries": [name]} if name == "openblas" else {}
pkg = types.ModuleType("numpy.distutils")
pkg.__path__, pkg.system_info = [], info
sys.modules.setdefault("numpy.distutils", pkg)
sys.modules.setdefault("numpy.distutils.system_info", info)
STUB
  PYTHONPATH="$work/stub" \
    "$py" -m pip download -q --no-deps --no-build-isolation --no-binary :all: -d "$dest" "MinkowskiEngine==0.5.4"
fi
(cd "$dest" && apt-get download -q libopenblas-dev libopenblas-pthread-dev libopenblas0-pthread libgfortran5 libquadmath0)
ls -l "$dest"
