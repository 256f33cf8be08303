#!/usr/bin/env bash
# End-to-end speed of a network on this machine: N validators as separate `keel start`
# processes (a `keel testnet`), driven by `keel loadgen` across all their RPC endpoints.
# Prints loadgen's JSON report on stdout; node logs and homes stay in --out.
#
#   scripts/e2e_network.sh [--keel PATH] [--validators N] [--block-time-ms T] [--tps R]
#                          [--duration S] [--accounts K] [--base-port P] [--out DIR]
#
# Defaults: ./target/release/keel, 4 validators, 200 ms blocks, 2000 transfers/s for 30 s,
# base port 36656, a new temporary folder. Every node is stopped on exit, whatever happens.
set -euo pipefail

KEEL=./target/release/keel
VALIDATORS=4
BLOCK_TIME_MS=200
TPS=2000
DURATION=30
ACCOUNTS=""
BASE_PORT=36656
OUT=""

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
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
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

ARGS=(--rpc "$URLS" --key "$OUT/net/node0/keys/validator.key" --tps "$TPS"
      --duration "$DURATION" --json)
[ -n "$ACCOUNTS" ] && ARGS+=(--accounts "$ACCOUNTS")
"$KEEL" loadgen "${ARGS[@]}"
echo "homes and node logs: $OUT" >&2
