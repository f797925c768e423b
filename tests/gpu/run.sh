#!/usr/bin/env bash
# The GPU verification step, for a host with an NVIDIA GPU (CI has none). Builds the CUDA
# backend for the local architecture and runs every `gpu` test; results go to $OUT (or
# build-gpu/) as gpu-results.txt. Meant to finish in a few minutes.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="${OUT:-$root/build-gpu}"
mkdir -p "$out"
log="$out/gpu-results.txt"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git -C "$root" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
} | tee "$log"
# A bundle from tests/gpu/bundle.sh (built on a machine with the Debian packages): run its
# binaries as they are, for GPU hosts that cannot install packages.
if [ -d "$root/.gpu-bundle" ]; then
  rc=0
  for t in "$root"/.gpu-bundle/*_test; do
    echo "== $(basename "$t")" | tee -a "$log"
    LD_LIBRARY_PATH="$root/.gpu-bundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$t" 2>&1 |
      tee -a "$log"
    r=${PIPESTATUS[0]}
    [ "$r" -eq 77 ] && echo "(skipped)" | tee -a "$log" && continue
    [ "$r" -ne 0 ] && rc=$r
  done
  exit "$rc"
fi
arch="${LS_GPU_ARCH:-90}"
start=$SECONDS
if ! "$root/scripts/setup.sh" --build-dir "$root/build-gpu" -DLS_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="$arch" >"$out/build.log" 2>&1; then
  echo "build failed (see build.log)" | tee -a "$log"; tail -50 "$out/build.log"; exit 1
fi
echo "build: $((SECONDS - start)) s" | tee -a "$log"
cd "$root/build-gpu" && ctest -L gpu --output-on-failure 2>&1 | tee -a "$log"
exit "${PIPESTATUS[0]}"
