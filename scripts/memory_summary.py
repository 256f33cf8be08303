#!/usr/bin/env python3
"""Summarize the OUT.mem samples of scripts/memory_under_load.sh.

Prints the peak resident set, the peak of jemalloc's allocated bytes, the highest pressure
level, and how much of the allocated bytes the consumers' keel_memory_used_bytes explain
(their sum over keel_memory_allocated_bytes, per sample: median, 10th percentile, range).
"""
import re
import statistics
import sys


def main(path):
    rows = []
    for line in open(path):
        row = {}
        for key, name in (("hwm", "VmHWM"), ("rss", "VmRSS")):
            m = re.search(name + r":\s+(\d+)", line)
            row[key] = int(m.group(1)) * 1024 if m else 0
        for key, name in (("alloc", "keel_memory_allocated_bytes"),
                          ("pressure", "keel_memory_pressure")):
            m = re.search(r"\b" + name + r" (\S+)", line)
            row[key] = float(m.group(1)) if m else 0.0
        row["used"] = {k: float(v) for k, v in
                       re.findall(r'keel_memory_used_bytes\{consumer="(\w+)"\} (\S+)', line)}
        if row["alloc"] > 0:
            rows.append(row)
    if not rows:
        sys.exit("no samples with metrics in " + path)
    mib = 1 << 20
    shares = sorted(sum(r["used"].values()) / r["alloc"] for r in rows)
    print("samples %d, peak VmHWM %.1f MiB, peak allocated %.1f MiB, highest pressure %d"
          % (len(rows), max(r["hwm"] for r in rows) / mib,
             max(r["alloc"] for r in rows) / mib, max(r["pressure"] for r in rows)))
    print("consumers explain of allocated: median %.1f%%, p10 %.1f%%, min %.1f%%, max %.1f%%"
          % (100 * statistics.median(shares), 100 * shares[len(shares) // 10],
             100 * shares[0], 100 * shares[-1]))
    top = max(rows, key=lambda r: r["alloc"])
    print("at peak allocated (MiB): " + ", ".join(
        "%s %.1f" % (k, v / mib) for k, v in top["used"].items())
        + ", allocated %.1f" % (top["alloc"] / mib))


if __name__ == "__main__":
    main(sys.argv[1])
