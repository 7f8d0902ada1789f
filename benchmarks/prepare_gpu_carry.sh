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

if ! ls "$dest"/[Mm]inkowski[Ee]ngine-0.5.4.tar.gz >/dev/null 2>&1; then
  PYTHON="$py" bash "$here/scripts/fetch_minkowski.sh" "$dest" 0.5.4
fi
(cd "$dest" && apt-get download -q libopenblas-dev libopenblas-pthread-dev libopenblas0-pthread libgfortran5 libquadmath0)
ls -l "$dest"
