#!/usr/bin/env python3
"""Plots the database size of `keel bench prune --json` (archive against a pruning window).

Usage:
    keel bench prune --blocks 2500 --txs 200 --keep 200 --interval 100 --json > prune.jsonl
    python3 scripts/plot_db_size.py prune.jsonl docs/db-size.svg

Reads the `prune-size` lines (height, live table bytes, bytes on disk per mode) and the
`prune` summary lines, writes a self-contained SVG (no plotting library needed), and prints
how flat the pruned run is once its window is full: the spread of live table bytes over the
samples from height keep + interval on, as a share of their mean (flat: at most 10%).
"""

import json
import sys

WIDTH, HEIGHT = 760, 420
LEFT, RIGHT, TOP, BOTTOM = 80, 150, 40, 60
COLOURS = {"archive": "#c0392b", "pruning": "#2471a3"}


def load(path):
    sizes, runs = {}, {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            row = json.loads(line)
            if row.get("pair", 1) != 1:
                continue  # `--pairs N`: the first pair is drawn
            if row.get("stage") == "prune-size":
                sizes.setdefault(row["mode"], []).append(
                    (row["height"], row["live_sst_bytes"], row["disk_bytes"])
                )
            elif row.get("stage") == "prune":
                runs[row["mode"]] = row
    return sizes, runs


def flatness(points, keep, interval):
    full = [live for (h, live, _) in points if h >= keep + interval]
    if len(full) < 2:
        return None
    mean = sum(full) / len(full)
    return (max(full) - min(full)) / mean if mean else None


def svg(sizes, runs):
    heights = [h for pts in sizes.values() for (h, _, _) in pts]
    values = [live for pts in sizes.values() for (_, live, _) in pts]
    x_max = max(heights) if heights else 1
    y_max = max(values) * 1.1 if values and max(values) else 1
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(h):
        return LEFT + plot_w * h / x_max

    def y(v):
        return TOP + plot_h * (1 - v / y_max)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
    ]
    run = next(iter(runs.values()), {})
    title = (
        f"keel bench prune: {run.get('blocks', '?')} blocks of {run.get('txs', '?')} transfers, "
        f"window {run.get('keep', '?')} / {run.get('interval', '?')}"
    )
    out.append(f'<text x="{LEFT}" y="22" font-size="14">{title}</text>')
    # Axes and ticks.
    out.append(
        f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{LEFT + plot_w}" y2="{TOP + plot_h}" '
        'stroke="black"/>'
    )
    out.append(f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}" stroke="black"/>')
    for i in range(6):
        v = y_max * i / 5
        out.append(
            f'<text x="{LEFT - 8}" y="{y(v) + 4:.1f}" text-anchor="end">'
            f"{v / (1 << 20):.1f}</text>"
        )
        out.append(
            f'<line x1="{LEFT}" y1="{y(v):.1f}" x2="{LEFT + plot_w}" y2="{y(v):.1f}" '
            'stroke="#ddd"/>'
        )
        h = x_max * i / 5
        out.append(
            f'<text x="{x(h):.1f}" y="{TOP + plot_h + 18}" text-anchor="middle">{h:.0f}</text>'
        )
    out.append(
        f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 15}" text-anchor="middle">height</text>'
    )
    out.append(
        f'<text x="18" y="{TOP + plot_h / 2}" text-anchor="middle" '
        f'transform="rotate(-90 18 {TOP + plot_h / 2})">live table bytes (MiB)</text>'
    )
    for i, (mode, pts) in enumerate(sorted(sizes.items())):
        colour = COLOURS.get(mode, "black")
        path = " ".join(f"{x(h):.1f},{y(live):.1f}" for (h, live, _) in sorted(pts))
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        ly = TOP + 20 + 20 * i
        out.append(
            f'<line x1="{LEFT + plot_w + 15}" y1="{ly}" x2="{LEFT + plot_w + 35}" y2="{ly}" '
            f'stroke="{colour}" stroke-width="2"/>'
        )
        out.append(f'<text x="{LEFT + plot_w + 40}" y="{ly + 4}">{mode}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sizes, runs = load(sys.argv[1])
    if not sizes:
        sys.exit(f"{sys.argv[1]}: no prune-size lines (run keel bench prune --json)")
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        f.write(svg(sizes, runs))
    for mode, pts in sorted(sizes.items()):
        run = runs.get(mode, {})
        spread = flatness(pts, run.get("keep", 0), run.get("interval", 0))
        last = sorted(pts)[-1][1] / (1 << 20)
        text = "n/a" if spread is None else f"{spread * 100:.1f}%"
        print(f"{mode}: last {last:.1f} MiB live; spread once the window is full: {text}")


if __name__ == "__main__":
    main()
