#!/usr/bin/env bash
# Runs libFuzzer targets for SECONDS over a scratch copy of their seed corpus, so the checked-in
# corpus is never modified. Crashes, leaks, timeouts and out-of-memory inputs land in a temporary
# directory that is kept (and printed) on failure; the exit status is non-zero on any finding.
#
#   tests/fuzz/run_fuzz.sh BUILD_DIR SECONDS [TARGET...|all] [extra libFuzzer flags...]
#
# TARGET is a fuzzer name (safetensors_fuzz, tokenizer_json_fuzz, tokenizer_encode_fuzz, ...; the
# "_fuzz" may be left off); none means safetensors_fuzz; "all" means every *_fuzz executable
# BUILD_DIR/tests/fuzz/ holds (the tokenizer fuzzers exist only when the tokenizer libraries do;
# a target named explicitly must exist, and so must every target's corpus). With several
# targets SECONDS is the total, split evenly between them (each runs in turn). Arguments that
# start with "-" go to libFuzzer. Each target TARGET uses the seeds in corpus/NAME/ and the
# dictionary dict/NAME.dict, NAME being TARGET without "_fuzz".
#
# BUILD_DIR is a build configured with -DLS_FUZZ=ON and clang (see docs/fuzzing.md). Set
# LS_FUZZ_KEEP=1 to keep the scratch directory (grown corpus and log) after a clean run, and
# LS_FUZZ_JOBS=N to fuzz with N worker processes (libFuzzer -fork=N).
set -euo pipefail

if [ $# -lt 2 ]; then
  echo "usage: $0 BUILD_DIR SECONDS [TARGET...|all] [libFuzzer flags...]" >&2
  exit 2
fi
build_dir="$1"
seconds="$2"
shift 2

targets=()
extra=()
for a in "$@"; do
  case "$a" in
    -*) extra+=("$a") ;;
    all)
      for f in "$build_dir"/tests/fuzz/*_fuzz; do
        if [ -f "$f" ] && [ -x "$f" ]; then targets+=("$(basename "$f")"); fi
      done
      if [ ${#targets[@]} -eq 0 ]; then
        echo "no fuzzer built in $build_dir/tests/fuzz (configure with -DLS_FUZZ=ON)" >&2
        exit 2
      fi
      ;;
    *_fuzz) targets+=("$a") ;;
    *) targets+=("${a}_fuzz") ;;
  esac
done
if [ ${#targets[@]} -eq 0 ]; then
  targets=(safetensors_fuzz)
fi
per_target=$((seconds / ${#targets[@]}))
if [ "$per_target" -lt 1 ]; then per_target=1; fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:symbolize=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}"

# run_one TARGET SECONDS: 0 when clean, 1 on a finding (scratch kept), 2 when not built.
run_one() {
  local target="$1" secs="$2"
  local name="${target%_fuzz}"
  local fuzzer="$build_dir/tests/fuzz/$target"
  local seeds="$here/corpus/$name"
  local dict="$here/dict/$name.dict"
  if [ ! -x "$fuzzer" ]; then
    echo "no fuzzer at $fuzzer: configure with CC=clang CXX=clang++ -DLS_FUZZ=ON and build the" \
         "$target target" >&2
    return 2
  fi
  if [ ! -d "$seeds" ]; then
    echo "no seed corpus at $seeds" >&2
    return 2
  fi

  local work corpus artifacts log
  work="$(mktemp -d "${TMPDIR:-/tmp}/$target.XXXXXX")"
  corpus="$work/corpus"
  artifacts="$work/artifacts"
  log="$work/fuzz.log"
  mkdir -p "$corpus" "$artifacts"
  cp "$seeds"/* "$corpus/"

  local flags=(
    -max_total_time="$secs"
    -timeout=10
    -rss_limit_mb=2048
    -print_final_stats=1
    -artifact_prefix="$artifacts/"
  )
  if [ -f "$dict" ]; then flags+=(-dict="$dict"); fi
  if [ -n "${LS_FUZZ_JOBS:-}" ]; then flags+=(-fork="$LS_FUZZ_JOBS"); fi

  echo "[run_fuzz] $fuzzer for ${secs}s; scratch $work" >&2
  local rc=0
  "$fuzzer" "${flags[@]}" ${extra[@]+"${extra[@]}"} "$corpus" >"$log" 2>&1 || rc=$?

  # Summary: the last coverage line and the final stats.
  grep -E '^#[0-9]+.*(DONE|pulse|REDUCE|NEW)' "$log" | tail -n 1 >&2 || true
  grep -E '^stat::' "$log" >&2 || true
  echo "[run_fuzz] corpus: $(find "$corpus" -type f | wc -l) files" >&2

  local findings
  findings="$(find "$artifacts" -type f | wc -l)"
  if [ "$rc" -ne 0 ] || [ "$findings" -ne 0 ]; then
    echo "[run_fuzz] $target FAILED: exit status $rc, $findings artifact(s) in $artifacts" >&2
    tail -n 60 "$log" >&2
    echo "[run_fuzz] full log: $log" >&2
    return 1
  fi
  if [ -n "${LS_FUZZ_KEEP:-}" ]; then
    echo "[run_fuzz] kept $work" >&2
  else
    rm -rf "$work"
  fi
  echo "[run_fuzz] $target OK: no findings in ${secs}s" >&2
  return 0
}

status=0
for t in "${targets[@]}"; do
  rc=0
  run_one "$t" "$per_target" || rc=$?
  if [ "$rc" -eq 2 ]; then exit 2; fi
  if [ "$rc" -ne 0 ]; then status=1; fi
done
exit "$status"
