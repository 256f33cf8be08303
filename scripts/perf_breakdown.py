#!/usr/bin/env python3
"""Where a keel node's CPU time went, from a `perf record -g --call-graph dwarf` profile.

    scripts/perf_breakdown.py PERF_DATA [--hz 499] [--seconds 15] [--json]

Each sample is put in one part of the node by its stack, read from the sampled function
outwards: the first frame that names a part decides (so the signature checks made for an RPC
submission count as signature checks, and a system call made to write an RPC answer counts
as RPC). Samples no frame claims are "runtime, kernel, other" (tokio's scheduler, idle
spinning, context switches). With --hz and --seconds (as given to `perf record -F HZ ...
sleep SECONDS`) each part is also given in cores. scripts/e2e_network.sh --perf-node runs it.
"""

import argparse
import collections
import json
import re
import subprocess
import sys

# (part, patterns): a frame belongs to the first part one of whose patterns it contains.
PARTS = [
    ("signature checks", [
        "keel_types::crypto::", "curve25519_dalek", "ed25519_dalek", "sha2::sha512",
        "keel_state::signatures::",
    ]),
    ("transaction decoding", ["keel_types::tx::", "keel_types::codec::", "prost::"]),
    ("mempool", ["keel_node::mempool::", "NodeContext::admit_verified"]),
    ("commit (finalize, RocksDB)", [
        "Ledger::finalize", "keel_storage::", "rocksdb::", "librocksdb", "rocksdb_",
    ]),
    ("execution (build, validate, state tree)", [
        "keel_state::", "Ledger::build_block", "Ledger::validate_block", "Ledger::",
    ]),
    ("consensus", ["keel_consensus::", "keel_node::host::"]),
    ("p2p (gossip, sync)", [
        "keel_p2p::", "libp2p", "yamux", "snow::", "ring_core", "keel_node::net::",
        "keel_node::sync::", "multistream", "quick_protobuf", "lz4",
    ]),
    ("RPC", ["keel_node::rpc::", "jsonrpsee", "hyper::", "serde_json", "tower::"]),
    # blake3's assembly keeps no frame records, so its callers (transaction hashes, the
    # state tree, block hashes) are not unwound.
    ("blake3 hashing (callers not unwound)", ["blake3"]),
    ("metrics, memory governor, pruner", [
        "keel_node::metrics", "keel_node::memory", "keel_node::pruner", "prometheus",
    ]),
]
OTHER = "runtime, kernel, other"

FRAME = re.compile(r"^\s*[0-9a-f]+ (.*) \((.*)\)$")


def samples(path):
    """Yields (thread name, [frame names, leaf first]) for each sample of the profile."""
    out = subprocess.run(
        ["perf", "script", "-i", path, "-F", "comm,tid,ip,sym,dso", "--no-inline"],
        check=True, capture_output=True, text=True,
    ).stdout
    comm, frames = None, []
    for line in out.splitlines():
        if not line.strip():
            if comm is not None:
                yield comm, frames
            comm, frames = None, []
        elif not line.startswith(("\t", " ")):
            comm, frames = line.split()[0], []
        else:
            m = FRAME.match(line)
            if m:
                frames.append(m.group(1) + " " + m.group(2))
    if comm is not None:
        yield comm, frames


def part_of(frames):
    for frame in frames:
        for part, patterns in PARTS:
            if any(p in frame for p in patterns):
                return part
    return OTHER


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("perf_data")
    ap.add_argument("--hz", type=float, help="perf record -F")
    ap.add_argument("--seconds", type=float, help="seconds recorded")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    parts, threads = collections.Counter(), collections.Counter()
    total = 0
    for comm, frames in samples(args.perf_data):
        total += 1
        parts[part_of(frames)] += 1
        threads[comm] += 1
    if total == 0:
        sys.exit("no samples in " + args.perf_data)
    per_core = args.hz * args.seconds if args.hz and args.seconds else None

    def row(n):
        r = {"samples": n, "share": round(n / total, 4)}
        if per_core:
            r["cores"] = round(n / per_core, 3)
        return r

    report = {
        "samples": total,
        "cores": round(total / per_core, 3) if per_core else None,
        "parts": {p: row(n) for p, n in parts.most_common()},
        "threads": {t: row(n) for t, n in threads.most_common()},
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return
    cores = f", {report['cores']} cores" if per_core else ""
    print(f"{total} samples{cores}")
    for title, table in (("part", report["parts"]), ("thread", report["threads"])):
        print(f"{title:<42} {'share':>7}" + (f" {'cores':>7}" if per_core else ""))
        for name, r in table.items():
            line = f"{name:<42} {100 * r['share']:6.1f}%"
            if per_core:
                line += f" {r['cores']:7.3f}"
            print(line)


if __name__ == "__main__":
    main()
