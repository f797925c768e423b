#!/usr/bin/env bash
# Installs every build and test dependency (Debian 12 / Ubuntu packages), creates the project's
# Python virtual environment, then configures and builds. Idempotent: a second run only builds.
#
#   scripts/setup.sh [--no-build] [--build-dir DIR] [extra cmake args...]
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build_dir="$root/build"
do_build=1
cmake_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --no-build) do_build=0 ;;
    --build-dir) build_dir="$2"; shift ;;
    *) cmake_args+=("$1") ;;
  esac
  shift
done

log() { printf '[setup] %s\n' "$*" >&2; }

if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1; then
  sudo=(sudo)
else
  log "not root and no sudo: cannot install packages"; exit 1
fi

# Debian 12 names; the NVIDIA images are Ubuntu (22.04/24.04) and use the same names except
# where noted below.
packages=(
  build-essential cmake ninja-build pkg-config git ca-certificates
  libgrpc++-dev libgrpc-dev protobuf-compiler protobuf-compiler-grpc libprotobuf-dev grpc-proto
  libabsl-dev
  prometheus-cpp-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  nlohmann-json3-dev libpcre2-dev libicu-dev libssl-dev
  clang clang-tools lld libclang-rt-dev
  prometheus
  python3 python3-venv python3-pip
  curl procps
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  # The prometheus package would start a server where an init system runs; we only need
  # promtool, so keep services from starting during the install.
  policy=/usr/sbin/policy-rc.d
  created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
    "${sudo[@]}" chmod +x "$policy"
    created_policy=1
  fi
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
  if [ "$created_policy" -eq 1 ]; then "${sudo[@]}" rm -f "$policy"; fi
else
  log "all packages present"
fi

# Python virtual environment for the tests and tools, with pinned packages. Recreated when the
# requirements change.
venv="$root/.venv"
req="$root/tools/requirements-test.txt"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$req" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "creating $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip==24.3.1
  "$venv/bin/python" -m pip install -q --require-virtualenv -r "$req"
  echo "$want" >"$stamp"
else
  log "virtual environment up to date"
fi

# The Python client (client/python, package loraserve_client) with stubs generated from proto/.
# Its in-tree build backend needs only grpcio-tools from the venv, so the install is offline
# (no build isolation, no index). Reinstalled when the client or the protos change.
client_stamp="$venv/.loraserve-client.sha256"
client_want="$(cd "$root" && find client/python proto -type f \
  \( -name '*.py' -o -name '*.toml' -o -name '*.proto' -o -name py.typed \) \
  -not -path '*/__pycache__/*' | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$client_stamp" 2>/dev/null)" != "$client_want" ]; then
  log "installing the Python client (client/python)"
  "$venv/bin/python" -m pip install -q --require-virtualenv --no-build-isolation --no-index \
    "$root/client/python"
  echo "$client_want" >"$client_stamp"
else
  log "Python client up to date"
fi

if [ "$do_build" -eq 1 ]; then
  gen=()
  command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
  if [ ! -f "$build_dir/CMakeCache.txt" ]; then
    cmake -S "$root" -B "$build_dir" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release "${cmake_args[@]}"
  elif [ ${#cmake_args[@]} -gt 0 ]; then
    cmake -S "$root" -B "$build_dir" "${cmake_args[@]}"
  fi
  cmake --build "$build_dir" -j"$(nproc)"
fi
