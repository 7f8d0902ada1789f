#!/usr/bin/env bash
# System packages MinkowskiEngine needs: OpenBLAS headers and library (Debian/Ubuntu).
set -euo pipefail
if [ -f /usr/include/x86_64-linux-gnu/openblas-pthread/cblas.h ] || [ -f /usr/include/openblas/cblas.h ] \
   || ls /usr/include/*/openblas-pthread/cblas.h >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "error: libopenblas-dev is missing and apt-get is not available; install OpenBLAS headers by hand" >&2
  exit 1
fi
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
echo "[setup] installing libopenblas-dev (apt)"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends libopenblas-dev >/dev/null
