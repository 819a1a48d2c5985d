#!/usr/bin/env python3
"""Plots the over-assignment demo's CSV (tests/examples/overcommit.rs) as
an SVG, with the standard library only.

Top panel: host memory each sandbox's VMM holds, stacked, against the
(pretend) host's size. Bottom panel: each sandbox's balloon. A second CSV
(a --no-policy run) adds its total as a dashed line for comparison.

Usage: benches/overcommit-plot.py POLICY.csv OUT.svg [NO_POLICY.csv]
"""

import csv
import sys

COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7"]
W, H = 900, 620
LEFT, RIGHT = 70, 160
TOP_Y0, TOP_H = 40, 330
BOT_Y0, BOT_H = 430, 140


def load(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    ids = sorted({k[: -len("_host_mib")] for k in rows[0] if k.endswith("_host_mib")})
    return rows, ids


def polyline(points, color, width=1.5, dash=None):
    pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    extra = f' stroke-dasharray="{dash}"' if dash else ""
    return f'<polyline fill="none" stroke="{color}" stroke-width="{width}"{extra} points="{pts}"/>'


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    rows, ids = load(sys.argv[1])
    other = load(sys.argv[3])[0] if len(sys.argv) == 4 else None
    tmax = max(float(r["t"]) for r in rows + (other or []))
    ymax = max(
        [float(r["limit_mib"]) for r in rows]
        + [float(r["total_mib"]) for r in rows + (other or [])]
    )
    ymax = (int(ymax / 256) + 1) * 256
    bmax = max([float(r[f"{i}_balloon_mib"]) for r in rows for i in ids] + [64])
    bmax = (int(bmax / 128) + 1) * 128
    pw = W - LEFT - RIGHT
    x = lambda t: LEFT + pw * t / tmax
    y = lambda v: TOP_Y0 + TOP_H * (1 - v / ymax)
    yb = lambda v: BOT_Y0 + BOT_H * (1 - v / bmax)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{LEFT}" y="22" font-size="14">Host memory of {len(ids)} sandboxes (stacked) vs the host\'s size</text>',
    ]
    # Axes and grid.
    for v in range(0, ymax + 1, 256):
        out.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v}</text>')
    for v in range(0, bmax + 1, 128):
        out.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{yb(v):.1f}" y2="{yb(v):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{LEFT - 6}" y="{yb(v) + 4:.1f}" text-anchor="end">{v}</text>')
    step = 10 if tmax <= 120 else 30
    for t in range(0, int(tmax) + 1, step):
        out.append(f'<text x="{x(t):.1f}" y="{BOT_Y0 + BOT_H + 16}" text-anchor="middle">{t}</text>')
    out.append(f'<text x="{LEFT + pw / 2}" y="{H - 8}" text-anchor="middle">seconds</text>')
    out.append(f'<text x="16" y="{TOP_Y0 + TOP_H / 2}" transform="rotate(-90 16 {TOP_Y0 + TOP_H / 2})" text-anchor="middle">MiB held on the host</text>')
    out.append(f'<text x="16" y="{BOT_Y0 + BOT_H / 2}" transform="rotate(-90 16 {BOT_Y0 + BOT_H / 2})" text-anchor="middle">balloon MiB</text>')

    # Phase bands.
    phases = {}
    for r in rows:
        phases.setdefault(int(r["phase"]), []).append(float(r["t"]))
    for p, ts in sorted(phases.items()):
        if 0 <= p < len(ids):
            out.append(f'<rect x="{x(min(ts)):.1f}" y="{TOP_Y0}" width="{x(max(ts)) - x(min(ts)):.1f}" height="{TOP_H}" fill="{COLORS[p % len(COLORS)]}" opacity="0.07"/>')
            out.append(f'<text x="{x(min(ts)) + 3:.1f}" y="{TOP_Y0 + 12}" fill="#666">{ids[p]} busy</text>')
        elif p == len(ids) + 1:
            out.append(f'<text x="{x(min(ts)) + 3:.1f}" y="{TOP_Y0 + 12}" fill="#666">host relieved</text>')

    # Stacked areas.
    base = [0.0] * len(rows)
    for n, i in enumerate(ids):
        top = [b + float(r[f"{i}_host_mib"]) for b, r in zip(base, rows)]
        pts = [(x(float(r["t"])), y(v)) for r, v in zip(rows, top)]
        pts += [(x(float(r["t"])), y(v)) for r, v in reversed(list(zip(rows, base)))]
        poly = " ".join(f"{a:.1f},{b:.1f}" for a, b in pts)
        out.append(f'<polygon points="{poly}" fill="{COLORS[n % len(COLORS)]}" opacity="0.75"/>')
        base = top
    # The host's size.
    out.append(polyline([(x(float(r["t"])), y(float(r["limit_mib"]))) for r in rows], "black", 2, "6,3"))
    if other:
        out.append(polyline([(x(float(r["t"])), y(float(r["total_mib"]))) for r in other], "#e15759", 2, "2,2"))
    # Balloons.
    for n, i in enumerate(ids):
        out.append(polyline([(x(float(r["t"])), yb(float(r[f"{i}_balloon_mib"]))) for r in rows], COLORS[n % len(COLORS)], 2))

    # Legend.
    lx = LEFT + pw + 14
    for n, i in enumerate(ids):
        ly = TOP_Y0 + 20 * n
        out.append(f'<rect x="{lx}" y="{ly}" width="12" height="12" fill="{COLORS[n % len(COLORS)]}"/>')
        out.append(f'<text x="{lx + 18}" y="{ly + 10}">{i}</text>')
    ly = TOP_Y0 + 20 * len(ids) + 10
    out.append(f'<line x1="{lx}" x2="{lx + 14}" y1="{ly}" y2="{ly}" stroke="black" stroke-width="2" stroke-dasharray="6,3"/>')
    out.append(f'<text x="{lx + 18}" y="{ly + 4}">host size</text>')
    if other:
        ly += 20
        out.append(f'<line x1="{lx}" x2="{lx + 14}" y1="{ly}" y2="{ly}" stroke="#e15759" stroke-width="2" stroke-dasharray="2,2"/>')
        out.append(f'<text x="{lx + 18}" y="{ly + 4}">total, no policy</text>')
    out.append("</svg>")
    with open(sys.argv[2], "w") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
