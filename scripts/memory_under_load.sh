#!/bin/bash
# Memory of a one-validator node under load (docs/benchmarks.md, "Memory under load").
#
#   scripts/memory_under_load.sh LIMIT TPS SECONDS READS_PER_SEC OUT
#
# Starts `keel start` in a fresh home (1 s blocks, memory.limit = LIMIT, ports 36656/36657/36660),
# drives it with `keel loadgen --tps TPS --duration SECONDS` and, alongside, `hey` reading
# state_getAccount at READS_PER_SEC; samples VmRSS/VmHWM and the node's memory metrics every
# 2 s into OUT.mem; leaves loadgen's JSON in OUT.json, hey's summary in OUT.hey, the metrics
# 20 s after the load in OUT.after and the final VmHWM in OUT.hwm. KEEL selects the binary
# (default: keel on PATH); BATCH=N makes loadgen send JSON-RPC batches of N (default 1);
# PROFILE=1 turns on `[metrics] profiling` and, halfway through the load, takes a 30 s CPU
# profile (OUT.cpu.pb.gz) and then a heap profile (OUT.heap.pb.gz) for `go tool pprof`.
# Summarize with scripts/memory_summary.py OUT.mem.
set -euo pipefail
LIMIT=$1; TPS=$2; SECS=$3; RPS=$4; OUT=$5
K=${KEEL:-keel}
command -v hey >/dev/null || { echo "needs hey (apt-get install -y hey)" >&2; exit 1; }
H=$(mktemp -d)
$K init --home "$H" >/dev/null
sed -i 's#listen_addr = "127.0.0.1:26660"#listen_addr = "127.0.0.1:36660"#; s#listen_addr = "127.0.0.1:26657"#listen_addr = "127.0.0.1:36657"#; s#/tcp/26656#/tcp/36656#; s#block_time_ms = 3000#block_time_ms = 1000#' "$H/config.toml"
sed -i "s#^limit = \"0\"#limit = \"$LIMIT\"#" "$H/config.toml"
[ "${PROFILE:-0}" = 1 ] && sed -i 's#^profiling = false#profiling = true#' "$H/config.toml"
$K start --home "$H" > "$OUT.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -rf "$H"' EXIT
sleep 4
ADDR=$(grep -oE '0x[0-9a-f]{40}' "$H/genesis.json" | head -1)
( while kill -0 $PID 2>/dev/null; do
    m=$(curl -s 127.0.0.1:36660/metrics || true)
    echo "$(date +%s) $(grep -E 'VmRSS|VmHWM' /proc/$PID/status | tr -s ' ' | tr '\n' ' ') $(echo "$m" | grep -E '^keel_(memory_(allocated|resident|pressure|used|budget|shrinks|refused)|finalized_height)' | tr '\n' ' ')"
    sleep 2
  done ) > "$OUT.mem" &
hey -z "${SECS}s" -q $((RPS / 10)) -c 10 -m POST -T application/json \
  -d "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"state_getAccount\",\"params\":[\"$ADDR\"]}" \
  http://127.0.0.1:36657/ > "$OUT.hey" 2>&1 &
HEY=$!
if [ "${PROFILE:-0}" = 1 ]; then
  ( sleep $((SECS / 2))
    curl -s -o "$OUT.cpu.pb.gz" 'http://127.0.0.1:36660/debug/pprof/profile?seconds=30'
    curl -s -o "$OUT.heap.pb.gz" http://127.0.0.1:36660/debug/pprof/heap ) &
fi
$K loadgen --rpc http://127.0.0.1:36657 --key "$H/keys/validator.key" --tps "$TPS" --duration "$SECS" --batch "${BATCH:-1}" --json > "$OUT.json"
wait $HEY
sleep 20
curl -s 127.0.0.1:36660/metrics > "$OUT.after"
grep VmHWM /proc/$PID/status > "$OUT.hwm"
