"""A location's runs over time as an inline SVG drawn on the server: no script, no CDN, no fetch.

Bars are the rows each run extracted (left axis), the line its reject rate (right axis).
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from growthhub_operator.queries import RunRow

WIDTH, HEIGHT = 720, 200
LEFT, RIGHT, TOP, BOTTOM = 56, 48, 14, 30  # margins: axis labels live there
BAR = "#4a90d9"
LINE = "#d9534f"


def runs_chart(runs: Sequence[RunRow]) -> str:
    """SVG markup of ``runs`` (oldest first); a short note when there is nothing to draw."""
    if not runs:
        return '<p class="muted">No runs recorded yet.</p>'
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    top_rows = max(max(r.extracted for r in runs), 1)
    top_rate = max(max(r.reject_rate for r in runs), 0.01)
    step = plot_w / len(runs)
    bar_w = max(step * 0.7, 1.0)

    def y_rows(n: float) -> float:
        return TOP + plot_h - plot_h * n / top_rows

    def y_rate(rate: float) -> float:
        return TOP + plot_h - plot_h * rate / top_rate

    parts = [
        f'<svg class="chart" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" '
        f'xmlns="http://www.w3.org/2000/svg" aria-label="rows and reject rate per run">',
        _axes(plot_w, plot_h, top_rows, top_rate),
    ]
    points = []
    for i, run in enumerate(runs):
        x = LEFT + i * step + (step - bar_w) / 2
        y = y_rows(run.extracted)
        tip = (
            f"{run.run_id}: {run.extracted} rows, {run.counts.get('quarantined', 0)} quarantined, "
            f"{run.counts.get('rejected', 0)} rejected, reject rate {run.reject_rate:.1%}"
        )
        parts.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{TOP + plot_h - y:.1f}" '
            f'fill="{BAR}"><title>{escape(tip)}</title></rect>'
        )
        points.append((LEFT + i * step + step / 2, y_rate(run.reject_rate)))
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    parts.append(f'<polyline points="{line}" fill="none" stroke="{LINE}" stroke-width="2"/>')
    parts.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{LINE}"/>' for x, y in points)
    parts.append(_time_labels(runs, plot_h))
    parts.append("</svg>")
    return "".join(parts)


def _axes(plot_w: float, plot_h: float, top_rows: int, top_rate: float) -> str:
    bottom, right = TOP + plot_h, LEFT + plot_w
    return (
        f'<line x1="{LEFT}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#999"/>'
        f'<text x="{LEFT - 6}" y="{TOP + 4}" text-anchor="end" class="axis">{top_rows:,}</text>'
        f'<text x="{LEFT - 6}" y="{bottom}" text-anchor="end" class="axis">0</text>'
        f'<text x="{LEFT - 6}" y="{TOP + plot_h / 2}" text-anchor="end" class="axis" fill="{BAR}">rows</text>'
        f'<text x="{right + 6}" y="{TOP + 4}" class="axis">{top_rate:.0%}</text>'
        f'<text x="{right + 6}" y="{bottom}" class="axis">0%</text>'
        f'<text x="{right + 6}" y="{TOP + plot_h / 2}" class="axis" fill="{LINE}">rejects</text>'
    )


def _time_labels(runs: Sequence[RunRow], plot_h: float) -> str:
    def label(run: RunRow) -> str:
        return run.started_at.strftime("%Y-%m-%d %H:%M") if run.started_at else run.run_id[:16]

    y = TOP + plot_h + 18
    first = f'<text x="{LEFT}" y="{y}" class="axis">{escape(label(runs[0]))}</text>'
    if len(runs) == 1:
        return first
    last = escape(label(runs[-1]))
    return first + f'<text x="{WIDTH - RIGHT}" y="{y}" text-anchor="end" class="axis">{last}</text>'
