#!/usr/bin/env python3
"""What share of a node's perf samples profiling took: profile_cost_perf.py OUT.perf

Reads `perf record -g` data of a keel node (scripts/profile_cost.sh) and counts the samples
in pprof's signal handler, in starting a CPU profile (ProfilerGuardBuilder::build, which
loads the symbols), on the keel-symbolize thread, in building the report and in freeing
the symbols, against all of the node's samples.
"""
import subprocess, sys, collections
out = subprocess.run(["perf", "script", "-i", sys.argv[1], "-F", "comm,tid,time,ip,sym"],
                     capture_output=True, text=True).stdout
cats = collections.Counter(); total = 0
first = last = None
for block in out.split("\n\n"):
    lines = [l for l in block.splitlines() if l.strip()]
    if not lines: continue
    head = lines[0]; stack = " ".join(lines[1:])
    total += 1
    comm = head.split()[0]
    if "perf_signal_handler" in stack: cats["sampler (pprof's signal handler)"] += 1
    elif "ProfilerGuardBuilder" in stack or "trigger_lazy" in stack: cats["start (ProfilerGuardBuilder::build)"] += 1
    elif comm.startswith("keel-symbol"): cats["symbolize (keel-symbolize thread)"] += 1
    elif "clear_symbol_cache" in stack or "forget_symbols" in stack: cats["freeing symbols"] += 1
    elif "build_unresolved" in stack: cats["report (build_unresolved)"] += 1
print(f"node samples: {total}")
for k, v in cats.most_common(): print(f"{k:40s} {v:7d} {100*v/total:6.2f}%")
print(f"{'all profiling':40s} {sum(cats.values()):7d} {100*sum(cats.values())/total:6.2f}%")
