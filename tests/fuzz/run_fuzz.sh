#!/usr/bin/env bash
# Runs the safetensors fuzzer for SECONDS over a scratch copy of the seed corpus, so the checked-in
# corpus is never modified. Crashes, leaks, timeouts and out-of-memory inputs land in a temporary
# directory that is kept (and printed) on failure; the exit status is non-zero on any finding.
#
#   tests/fuzz/run_fuzz.sh BUILD_DIR SECONDS [extra libFuzzer flags...]
#
# BUILD_DIR is a build configured with -DLS_FUZZ=ON and clang (see docs/fuzzing.md). Set
# LS_FUZZ_KEEP=1 to keep the scratch directory (grown corpus and log) after a clean run, and
# LS_FUZZ_JOBS=N to fuzz with N worker processes (libFuzzer -fork=N).
set -euo pipefail

if [ $# -lt 2 ]; then
  echo "usage: $0 BUILD_DIR SECONDS [libFuzzer flags...]" >&2
  exit 2
fi
build_dir="$1"
seconds="$2"
shift 2

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
fuzzer="$build_dir/tests/fuzz/safetensors_fuzz"
seeds="$here/corpus/safetensors"
if [ ! -x "$fuzzer" ]; then
  echo "no fuzzer at $fuzzer: configure with CC=clang CXX=clang++ -DLS_FUZZ=ON and build the" \
       "safetensors_fuzz target" >&2
  exit 2
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/safetensors_fuzz.XXXXXX")"
corpus="$work/corpus"
artifacts="$work/artifacts"
log="$work/fuzz.log"
mkdir -p "$corpus" "$artifacts"
cp "$seeds"/* "$corpus/"

# Tokens of the format, so mutations can produce well-formed entries.
cat > "$work/safetensors.dict" <<'EOF'
"{"
"}"
"["
"]"
":"
","
"\""
"\\u0000"
"dtype"
"shape"
"data_offsets"
"__metadata__"
"null"
"true"
"false"
"format"
"pt"
"BOOL"
"U8"
"I8"
"U16"
"I16"
"F16"
"BF16"
"U32"
"I32"
"F32"
"U64"
"I64"
"F64"
"C64"
"F8_E5M2"
"F8_E4M3"
"F8_E8M0"
"F8_E4M3FNUZ"
"F8_E5M2FNUZ"
"F6_E2M3"
"F6_E3M2"
"F4"
"18446744073709551615"
"18446744073709551616"
"9223372036854775807"
"4294967296"
"-1"
"1e400"
"0.5"
"        "
EOF

flags=(
  -max_total_time="$seconds"
  -timeout=10
  -rss_limit_mb=2048
  -print_final_stats=1
  -dict="$work/safetensors.dict"
  -artifact_prefix="$artifacts/"
)
if [ -n "${LS_FUZZ_JOBS:-}" ]; then
  flags+=(-fork="$LS_FUZZ_JOBS")
fi

echo "[run_fuzz] $fuzzer for ${seconds}s; scratch $work" >&2
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:symbolize=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}"
rc=0
"$fuzzer" "${flags[@]}" "$@" "$corpus" >"$log" 2>&1 || rc=$?

# Summary: the last coverage line and the final stats.
grep -E '^#[0-9]+.*(DONE|pulse|REDUCE|NEW)' "$log" | tail -n 1 >&2 || true
grep -E '^stat::' "$log" >&2 || true
echo "[run_fuzz] corpus: $(find "$corpus" -type f | wc -l) files" >&2

findings="$(find "$artifacts" -type f | wc -l)"
if [ "$rc" -ne 0 ] || [ "$findings" -ne 0 ]; then
  echo "[run_fuzz] FAILED: exit status $rc, $findings artifact(s) in $artifacts" >&2
  tail -n 60 "$log" >&2
  echo "[run_fuzz] full log: $log" >&2
  exit 1
fi
if [ -n "${LS_FUZZ_KEEP:-}" ]; then
  echo "[run_fuzz] kept $work" >&2
else
  rm -rf "$work"
fi
echo "[run_fuzz] OK: no findings in ${seconds}s" >&2
