#!/usr/bin/env bash
# The README's run command: set-up and build (idempotent), start loraserve, show what it
# serves with loractl, then keep the server in the foreground until Ctrl-C (or SIGTERM), which
# drains it and exits 0.
#
#   scripts/run.sh [loraserve flags...]     e.g. scripts/run.sh --model=/path/to/hf-model
#
# Without --model it serves the smallest model the repository has: a tiny random Llama from
# the golden test fixtures (it computes, but writes noise; the demo model replaces it).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
bin="$root/build/server/loraserve"
ctl="$root/build/client/loractl"

model_args=()
case " $* " in *" --model="*|*" --model "*) ;; *) model_args=(--model="$root/tests/golden/fixtures/llama_gqa") ;; esac
address="${LS_ADDRESS:-127.0.0.1:50051}"
metrics="${LS_METRICS_ADDRESS:-127.0.0.1:9464}"
ready_file="$(mktemp)"
trap 'rm -f "$ready_file"' EXIT
# The server runs in its own session so that Ctrl-C reaches it once, forwarded by the trap below
# as SIGTERM (a second signal would cut its drain short).
setsid "$bin" --address="$address" --metrics_address="$metrics" "${model_args[@]}" "$@" \
  >"$ready_file" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null || true' INT TERM

for _ in $(seq 1 600); do
  grep -q '^loraserve ready' "$ready_file" && break
  kill -0 "$pid" 2>/dev/null || { wait "$pid"; exit $?; }
  sleep 0.1
done
cat "$ready_file"
grpc_addr="$(sed -n 's/^loraserve ready grpc=\([^ ]*\) metrics=.*/\1/p' "$ready_file")"
metrics_addr="$(sed -n 's/^loraserve ready grpc=[^ ]* metrics=\(.*\)/\1/p' "$ready_file")"

echo
echo "\$ loractl --address=$grpc_addr health"
"$ctl" --address="$grpc_addr" health || true
echo
echo "\$ loractl --address=$grpc_addr model-info"
"$ctl" --address="$grpc_addr" model-info || true
echo
echo "metrics: curl http://$metrics_addr/metrics"
echo "loraserve is running (pid $pid); Ctrl-C stops it."
set +e
while kill -0 "$pid" 2>/dev/null; do wait "$pid"; rc=$?; done
exit "${rc:-0}"
