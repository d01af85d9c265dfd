"""A dependency-free SVG of a run's curves: training LM loss, held-out NLL without and with thoughts (and on the
hard tokens alone, when the data marks them: the answers of the synthetic corpus).

python benchmarks/plot_run.py runs/qstar docs/default-run.svg
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

WIDTH, HEIGHT, PAD = 640, 320, 48
SERIES = [
    ("train", "lm", "#888", "train LM loss"),
    ("val", "nll_base", "#1f77b4", "held-out NLL, no thought"),
    ("val", "nll_talk", "#d62728", "held-out NLL, with thought"),
    ("val", "nll_base_hard", "#6baed6", "held-out answers, no thought"),
    ("val", "nll_talk_hard", "#fc9272", "held-out answers, with thought"),
]


def render(records: list[dict]) -> str:
    points = {
        key: [(r["step"], r[key]) for r in records if r["split"] == split and key in r] for split, key, _, _ in SERIES
    }
    series = [s for s in SERIES if points[s[1]]]
    values = [v for series in points.values() for _, v in series]
    lo, hi, last = min(values), max(values), max(s for series in points.values() for s, _ in series)

    def x(step: float) -> float:
        return PAD + (WIDTH - 2 * PAD) * step / last

    legend = 16 * len(series)  # the labels go under the plot
    height = HEIGHT + legend

    def y(value: float) -> float:
        return HEIGHT - PAD - (HEIGHT - 2 * PAD) * (value - lo) / max(hi - lo, 1e-9)

    left, right, top, bottom = PAD, WIDTH - PAD, PAD, HEIGHT - PAD
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" '
        'font-size="12"><rect width="100%" height="100%" fill="white"/>',
        f'<path d="M{left},{top} V{bottom} H{right}" fill="none" stroke="black"/>',  # the axes
        f'<text x="{(left + right) / 2}" y="{bottom + 30}" text-anchor="middle">step</text>',
        f'<text x="12" y="{(top + bottom) / 2}" transform="rotate(-90 12 {(top + bottom) / 2})" '
        'text-anchor="middle">NLL (nats)</text>',
    ]
    for i in range(5):  # ticks: five steps, five NLL values
        step, value = last * i / 4, lo + (hi - lo) * i / 4
        parts.append(f'<line x1="{x(step):.1f}" y1="{bottom}" x2="{x(step):.1f}" y2="{bottom + 4}" stroke="black"/>')
        parts.append(f'<text x="{x(step):.1f}" y="{bottom + 16}" text-anchor="middle">{step:.0f}</text>')
        parts.append(f'<line x1="{left - 4}" y1="{y(value):.1f}" x2="{left}" y2="{y(value):.1f}" stroke="black"/>')
        parts.append(f'<text x="{left - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{value:.2f}</text>')
    for i, (_, key, colour, label) in enumerate(series):
        line = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points[key])
        dash = ' stroke-dasharray="6 3"' if key.endswith("_hard") else ""
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} points="{line}"/>')
        parts.append(f'<text x="{PAD}" y="{HEIGHT + 16 * i}" fill="{colour}">{label}</text>')
    return "\n".join(parts + ["</svg>"])


if __name__ == "__main__":
    run, out = Path(sys.argv[1]), Path(sys.argv[2])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(records))
    print(f"wrote {out}")
