#!/usr/bin/env python3
"""Transfers made final per window of time, from a node's log (its `finalized block ... txs=N`
lines, logged as each block becomes final on that node).

    scripts/final_rate.py NODE_LOG [--window 10]

Prints one line per window from the first block with transactions to the last: its start
(seconds since the first), the transactions finalized in it and their rate; then the rate
from the first to the last such block. scripts/e2e_network.sh prints it for node 0.
"""

import argparse
import datetime
import re

LINE = re.compile(r"^(\S+)Z .*finalized block height=(\d+) .* txs=(\d+)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("--window", type=float, default=10.0)
    args = ap.parse_args()
    blocks = []
    for line in open(args.log, encoding="utf-8", errors="replace"):
        m = LINE.match(line)
        if m:
            t = datetime.datetime.fromisoformat(m.group(1)).timestamp()
            blocks.append((t, int(m.group(2)), int(m.group(3))))
    busy = [b for b in blocks if b[2] > 0]
    if not busy:
        print("no final block with transactions in", args.log)
        return
    t0, t1 = busy[0][0], busy[-1][0]
    windows = {}
    for t, _, n in blocks:
        if t0 <= t <= t1:
            k = int((t - t0) // args.window)
            windows[k] = windows.get(k, 0) + n
    for k in sorted(windows):
        span = min(args.window, t1 - t0 - k * args.window) if k * args.window < t1 - t0 else args.window
        rate = windows[k] / span if span > 0 else float("nan")
        print(f"{k * args.window:6.0f} s  {windows[k]:8d} txs  {rate:9.1f} /s")
    total = sum(n for _, _, n in busy)
    # From the first final block with transactions to the last: the first one's own
    # transactions were made final at t0, so they are not part of the rate.
    rate = (total - busy[0][2]) / (t1 - t0) if t1 > t0 else float("nan")
    print(f"{total} txs in {len(busy)} blocks over {t1 - t0:.1f} s: {rate:.1f} /s final")


if __name__ == "__main__":
    main()
