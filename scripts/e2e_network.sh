#!/usr/bin/env bash
# End-to-end speed of a network on this machine: N validators as separate `keel start`
# processes (a `keel testnet`), driven by `keel loadgen` across all their RPC endpoints.
# Prints loadgen's JSON report on stdout; on stderr the transfers final per 10 s on validator 0
# (scripts/final_rate.py) and the CPU time of loadgen and of each validator. Node logs and
# homes stay in --out.
#
#   scripts/e2e_network.sh [--keel PATH] [--validators N] [--block-time-ms T] [--tps R]
#                          [--duration S] [--accounts K] [--base-port P] [--out DIR]
#                          [--batch N] [--perf-node I] [--perf-seconds N]
#
# Defaults: ./target/release/keel, 4 validators, 200 ms blocks, 2000 transfers/s for 30 s,
# base port 36656, a new temporary folder. Every node is stopped on exit, whatever happens.
# --batch N: loadgen sends N transfers per request as a JSON-RPC batch (default 1).
# --perf-node I records a CPU profile of validator I with Linux `perf` (DWARF call graphs,
# so any build works) for N seconds (default 15) from 2 s into the send phase, into
# DIR/perf.data, and prints where its time went (scripts/perf_breakdown.py) on stderr.
set -euo pipefail

KEEL=./target/release/keel
VALIDATORS=4
BLOCK_TIME_MS=200
TPS=2000
DURATION=30
ACCOUNTS=""
BASE_PORT=36656
OUT=""
PERF_NODE=""
PERF_SECONDS=15
BATCH=1

while [ $# -gt 0 ]; do
  case "$1" in
    --keel) KEEL=$2; shift 2 ;;
    --validators) VALIDATORS=$2; shift 2 ;;
    --block-time-ms) BLOCK_TIME_MS=$2; shift 2 ;;
    --tps) TPS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --accounts) ACCOUNTS=$2; shift 2 ;;
    --base-port) BASE_PORT=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --batch) BATCH=$2; shift 2 ;;
    --perf-node) PERF_NODE=$2; shift 2 ;;
    --perf-seconds) PERF_SECONDS=$2; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

[ -x "$KEEL" ] || { echo "no keel binary at $KEEL (make release, or --keel PATH)" >&2; exit 2; }
[ -n "$OUT" ] || OUT=$(mktemp -d /tmp/keel-e2e-XXXXXX)
rm -rf "$OUT/net"
mkdir -p "$OUT"

"$KEEL" testnet --validators "$VALIDATORS" --out "$OUT/net" --base-port "$BASE_PORT" \
  --block-time-ms "$BLOCK_TIME_MS" --chain-id keel-e2e >"$OUT/testnet.txt"

PIDS=()
stop_all() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
}
trap stop_all EXIT INT TERM

URLS=""
for i in $(seq 0 $((VALIDATORS - 1))); do
  "$KEEL" start --home "$OUT/net/node$i" >"$OUT/node$i.log" 2>&1 &
  PIDS+=($!)
  URLS="${URLS:+$URLS,}http://127.0.0.1:$((BASE_PORT + 3 * i + 1))"
done

# Wait until every node answers and the chain has made a final block.
for url in ${URLS//,/ }; do
  for _ in $(seq 1 300); do
    if curl -sf -m 1 -H 'content-type: application/json' \
        -d '{"jsonrpc":"2.0","id":1,"method":"chain_status"}' "$url" \
        | grep -q '"finalized_height":[1-9]'; then
      break
    fi
    sleep 0.1
  done
done

# The profile: wait until validator PERF_NODE has committed the funding transfers and 2 s
# of the send phase, then record it.
PERF_PID=""
if [ -n "$PERF_NODE" ]; then
  command -v perf >/dev/null || { echo "--perf-node needs perf (apt-get install -y linux-perf)" >&2; exit 2; }
  K=${ACCOUNTS:-$(( (TPS + 7) / 8 > 16 ? (TPS + 7) / 8 : 16 ))}
  METRICS="http://127.0.0.1:$((BASE_PORT + 3 * PERF_NODE + 2))/metrics"
  (
    while :; do
      n=$(curl -sf -m 1 "$METRICS" | awk '$1 == "keel_txs_committed_total" {print int($2)}')
      [ "${n:-0}" -ge $((K + 2 * TPS)) ] && break
      sleep 0.2
    done
    perf record -F 499 -g --call-graph dwarf,16384 -p "${PIDS[$PERF_NODE]}" \
      -o "$OUT/perf.data" -- sleep "$PERF_SECONDS" >"$OUT/perf.log" 2>&1
  ) &
  PERF_PID=$!
fi

ARGS=(--rpc "$URLS" --key "$OUT/net/node0/keys/validator.key" --tps "$TPS"
      --duration "$DURATION" --batch "$BATCH" --json)
[ -n "$ACCOUNTS" ] && ARGS+=(--accounts "$ACCOUNTS")
TIMEFORMAT="loadgen: %U s user, %S s system, %R s wall"
time "$KEEL" loadgen "${ARGS[@]}"
# Transfers final per 10 s on validator 0 (from its log): a sustained rate shows as even
# windows, a network falling behind as a dip during the send phase and a burst after it.
python3 "$(dirname "$0")/final_rate.py" "$OUT/node0.log" >&2 || true
# CPU each validator used over the whole run (start, funding, sending, drain).
HZ=$(getconf CLK_TCK)
for i in "${!PIDS[@]}"; do
  awk -v i="$i" -v hz="$HZ" '{printf "node%d: %.1f s CPU (user %.1f, system %.1f)\n", i, ($14+$15)/hz, $14/hz, $15/hz}' \
    "/proc/${PIDS[$i]}/stat" >&2 || true
done
if [ -n "$PERF_PID" ]; then
  wait "$PERF_PID" || true
  if [ -s "$OUT/perf.data" ]; then
    python3 "$(dirname "$0")/perf_breakdown.py" "$OUT/perf.data" --hz 499 --seconds "$PERF_SECONDS" >&2 || true
  else
    echo "no profile recorded (see $OUT/perf.log)" >&2
  fi
fi
echo "homes and node logs: $OUT" >&2
