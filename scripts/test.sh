#!/usr/bin/env bash
# The test command (README, .ci/run): set-up, build, the ctest suite (labels unit and e2e; gpu
# tests skip without a GPU; slow ones are left out), then the CPU-only sanitizer lanes:
# AddressSanitizer+UndefinedBehaviorSanitizer over the unit tests plus a bounded fuzz run, and
# ThreadSanitizer over the concurrency tests. Prints how long each stage took.
#
#   scripts/test.sh            everything
#   LS_TEST_STAGES="build ctest" scripts/test.sh   a subset (setup build ctest asan fuzz tsan)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
stages="${LS_TEST_STAGES:-setup build ctest asan fuzz tsan}"
fuzz_seconds="${LS_FUZZ_SECONDS:-60}"
jobs="$(nproc)"
# CI builds CUDA for sm_90 only; a full build covers sm_80 and sm_90.
if [ "${CI:-}" = "true" ]; then cuda_archs="90"; else cuda_archs="${LS_CUDA_ARCHITECTURES:-80;90}"; fi

gen=()
command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
times=()
total_start=$SECONDS

run_stage() {
  local name="$1"; shift
  case " $stages " in *" $name "*) ;; *) return 0 ;; esac
  printf '\n===== stage %s =====\n' "$name"
  local start=$SECONDS
  "$@"
  local took=$((SECONDS - start))
  times+=("$(printf '%-6s %5d s' "$name" "$took")")
  printf '===== stage %s: %d s =====\n' "$name" "$took"
}

configure() {  # configure DIR [cmake args...]: configures once, reconfigures when args change
  local dir="$1"; shift
  cmake -S "$root" -B "$dir" "${gen[@]}" "$@" >"$dir/configure.log" 2>&1 ||
    { cat "$dir/configure.log"; return 1; }
  grep -E -- '-- (loraserve|  LS_|    )' "$dir/configure.log" || true
}

stage_setup() { "$root/scripts/setup.sh" --no-build; }

stage_build() {
  mkdir -p build
  configure build -DCMAKE_BUILD_TYPE=Release -DLS_WERROR=ON "-DCMAKE_CUDA_ARCHITECTURES=$cuda_archs"
  cmake --build build -j"$jobs"
}

stage_ctest() {
  (cd build && ctest -LE slow --output-on-failure -j"$jobs" --timeout 600)
}

stage_asan() {
  mkdir -p build-asan
  CC=clang CXX=clang++ configure build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLS_CUDA=OFF \
    -DLS_SERVER=OFF -DLS_FUZZ=ON -DLS_WERROR=ON "-DLS_SANITIZE=address,undefined"
  cmake --build build-asan -j"$jobs"
  (cd build-asan && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest -L unit --output-on-failure -j"$jobs" --timeout 900)
}

# Every fuzz target the asan build has (safetensors, tokenizer.json, tokenizer encode, ...), the
# seconds split evenly between them.
stage_fuzz() { "$root/tests/fuzz/run_fuzz.sh" "$root/build-asan" "$fuzz_seconds" all; }

stage_tsan() {
  mkdir -p build-tsan
  CC=clang CXX=clang++ configure build-tsan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLS_CUDA=OFF \
    -DLS_SERVER=OFF -DLS_WERROR=ON -DLS_SANITIZE=thread
  # Only the concurrency tests (ctest names are their target names): other tests may replace
  # operator new, which the TSan runtime owns.
  local targets
  targets="$(cd build-tsan && ctest -L concurrency -N | sed -n 's/^ *Test *#[0-9]*: *//p')"
  # shellcheck disable=SC2086
  cmake --build build-tsan -j"$jobs" --target $targets
  (cd build-tsan && TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 \
    ctest -L concurrency --output-on-failure -j"$jobs" --timeout 900)
}

run_stage setup stage_setup
run_stage build stage_build
run_stage ctest stage_ctest
run_stage asan stage_asan
run_stage fuzz stage_fuzz
run_stage tsan stage_tsan

printf '\n===== stage times =====\n'
for t in "${times[@]}"; do printf '%s\n' "$t"; done
printf 'total  %5d s\n' "$((SECONDS - total_start))"
