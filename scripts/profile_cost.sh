#!/bin/bash
# What CPU profiles cost a loaded one-validator node (docs/profiling.md, "What it costs").
#
#   scripts/profile_cost.sh KEEL OUT [TPS]
#
# Starts `KEEL start` in a fresh home (1 s blocks, profiling = true, ports 36656/36657/36660),
# drives it with `keel loadgen --tps TPS --batch 50` (default 9000) for 220 s, takes a 30 s
# CPU profile at 60 s (the first: symbols not yet loaded) and another at 150 s, records the
# node with `perf record -F 499 -g` for 45 s from 58 s, and samples the node's utime+stime
# and keel_txs_committed_total every 5 s into OUT.cpu. Prints the node's "CPU profile taken"
# log lines (start and symbolizing CPU time of each profile) and what share of the node's
# perf samples profiling took (scripts/profile_cost_perf.py). Use a frame-pointer build
# (RUSTFLAGS="-C force-frame-pointers=yes") for full stacks.
set -euo pipefail
K=$1; OUT=$2; TPS=${3:-9000}
command -v perf >/dev/null || { echo "needs perf (apt-get install -y linux-perf)" >&2; exit 1; }
H=$(mktemp -d)
"$K" init --home "$H" >/dev/null
sed -i 's#listen_addr = "127.0.0.1:26660"#listen_addr = "127.0.0.1:36660"#; s#listen_addr = "127.0.0.1:26657"#listen_addr = "127.0.0.1:36657"#; s#/tcp/26656#/tcp/36656#; s#block_time_ms = 3000#block_time_ms = 1000#; s#^profiling = false#profiling = true#' "$H/config.toml"
"$K" start --home "$H" > "$OUT.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true; sleep 1; rm -rf "$H"' EXIT
sleep 4
T0=$(date +%s)
"$K" loadgen --rpc http://127.0.0.1:36657 --key "$H/keys/validator.key" --tps "$TPS" \
  --duration 220 --batch 50 --json > "$OUT.json" 2>/dev/null &
LOADGEN=$!
( while kill -0 $PID 2>/dev/null; do
    t=$(( $(date +%s) - T0 )); c=$(awk '{print $14+$15}' /proc/$PID/stat)
    n=$(curl -s 127.0.0.1:36660/metrics | awk '/^keel_txs_committed_total/ {print $2}')
    echo "$t $c $n"; sleep 5
  done ) > "$OUT.cpu" &
sleep 58
perf record -F 499 -g -o "$OUT.perf" -p $PID -- sleep 45 > /dev/null 2>&1 &
PERF=$!
sleep 2
curl -s -o "$OUT.p1.pb.gz" 'http://127.0.0.1:36660/debug/pprof/profile?seconds=30'
sleep $(( 150 - ($(date +%s) - T0) ))
curl -s -o "$OUT.p2.pb.gz" 'http://127.0.0.1:36660/debug/pprof/profile?seconds=30'
wait $PERF $LOADGEN
grep "CPU profile taken" "$OUT.log" || true
python3 "$(dirname "$0")/profile_cost_perf.py" "$OUT.perf"
