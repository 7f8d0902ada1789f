#!/usr/bin/env bash
# Fetch the MinkowskiEngine source release into DEST with pip (no registry host named here).
# Usage: PYTHON=/path/to/python scripts/fetch_minkowski.sh DEST [VERSION]
#
# pip prepares an sdist's metadata by running its setup.py, which needs torch and, without --blas,
# imports numpy.distutils (gone from numpy 2 and from every numpy on Python >= 3.12): for that one
# step a sitecustomize stub answers its BLAS query; the real build passes --blas itself.
set -euo pipefail
dest="$1"
version="${2:-0.5.4}"
py="${PYTHON:-python3}"
stub="$(mktemp -d)"
trap 'rm -rf "$stub"' EXIT
cat > "$stub/sitecustomize.py" <<'STUB'
import sys, types
info = types.ModuleType("numpy.distutils.system_info")
info.get_info = lambda name, *a, **k: {"libraries": [name]} if name == "openblas" else {}
pkg = types.ModuleType("numpy.distutils")
pkg.__path__, pkg.system_info = [], info
sys.modules.setdefault("numpy.distutils", pkg)
sys.modules.setdefault("numpy.distutils.system_info", info)
STUB
mkdir -p "$dest"
PYTHONPATH="$stub" "$py" -m pip download -q --no-deps --no-build-isolation --no-binary :all: -d "$dest" \
  "MinkowskiEngine==$version"
