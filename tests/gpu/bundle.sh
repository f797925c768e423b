#!/usr/bin/env bash
# Packs the GPU test binaries built here (nvcc is installed, no GPU is) with the shared libraries
# they need that a bare GPU host lacks (Abseil, the CUDA runtime) into .gpu-bundle/, so that
# tests/gpu/run.sh can run them on a machine that has a GPU but no Debian packages.
#   tests/gpu/bundle.sh [BUILD_DIR]        (default: build)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build="${1:-$root/build}"
cmake --build "$build" --target cuda_convert_test
out="$root/.gpu-bundle"
rm -rf "$out" && mkdir -p "$out/lib"
for t in "$build"/tests/gpu/*_test; do
  cp "$t" "$out/"
  ldd "$t" | awk '/=> \// {print $3}' | grep -E 'libabsl_|libcudart|libgtest|libgmock' |
    while read -r lib; do cp -L "$lib" "$out/lib/"; done
done
echo "bundled: $(ls "$out" | grep _test | tr '\n' ' ')($(du -sh "$out" | cut -f1))"
