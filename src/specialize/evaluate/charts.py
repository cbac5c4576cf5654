"""The charts and tables of the self-contained report pages (compare's report.html, the curve's
curve.html): inline SVG and HTML only, every piece of data text escaped (model outputs are untrusted)."""

from __future__ import annotations

import math
from html import escape

COLORS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1", "#edc948", "#9c755f")

CSS = """body{font-family:sans-serif;margin:2em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:right;vertical-align:top}th{background:#f3f3f3}td.text{text-align:left;
white-space:pre-wrap;max-width:28em;font-family:monospace;font-size:90%}
.rec{background:#eef6ee;border:1px solid #9c9;padding:.5em 1em}.tag{background:#eee;
border-radius:3px;padding:0 4px;margin-right:3px;font-size:80%}svg{margin:0 1em 1em 0}
svg text{font-size:11px;font-family:sans-serif}"""


def fmt_value(value) -> str:
    """A number or text as a table shows it: 3 decimals, "–" for none, text escaped."""
    if value is None:
        return "–"
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3f}" if math.isfinite(value) else str(value)
    return escape(str(value))


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values spanning [lo, hi] (steps of 1, 2 or 5 times a power of ten)."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if step * m >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def svg_axes(box: tuple[int, ...], x_ticks: list[tuple[float, str]], y_ticks: list[tuple[float, str]],
             x_label: str, y_label: str) -> list[str]:
    """A chart's axes, tick labels, grid lines and axis titles; ticks are (pixel position, label)."""
    width, height, left, right, top, bottom = box
    out = [f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#888"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#888"/>']
    out += [f'<text x="{x:.1f}" y="{height - bottom + 14}" text-anchor="middle">{escape(label)}</text>'
            for x, label in x_ticks]
    out += [f'<text x="{left - 5}" y="{y + 4:.1f}" text-anchor="end">{escape(label)}</text>'
            f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="#eee"/>' for y, label in y_ticks]
    middle = (top + height - bottom) / 2
    return out + [f'<text x="{(left + width - right) / 2}" y="{height - 8}" text-anchor="middle">'
                  f'{escape(x_label)}</text>',
                  f'<text x="12" y="{middle}" text-anchor="middle" transform="rotate(-90 12 {middle})">'
                  f'{escape(y_label)}</text>']


def chart(series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str,
          lines: bool, labels: bool = False, y_range: tuple[float, float] | None = None) -> str:
    """An SVG line chart (lines=True) or scatter plot of named point series."""
    width, height, left, right, top, bottom = 560, 300, 60, 150, 15, 45
    points = [p for pts in series.values() for p in pts]
    if not points:
        return ""
    x_lo, x_hi = min(0.0, min(x for x, _ in points)), max(x for x, _ in points) or 1.0
    y_lo, y_hi = y_range or (min(y for _, y in points), max(y for _, y in points))
    if y_hi <= y_lo:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    x_hi += (x_hi - x_lo) * (0.0 if lines else 0.1)

    def sx(x):
        return left + (x - x_lo) / (x_hi - x_lo or 1) * (width - left - right)

    def sy(y):
        return height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom)

    out = [f'<svg width="{width}" height="{height}" role="img">',
           *svg_axes((width, height, left, right, top, bottom), [(sx(t), f"{t:g}") for t in nice_ticks(x_lo, x_hi)],
                     [(sy(t), f"{t:g}") for t in nice_ticks(y_lo, y_hi)], x_label, y_label)]
    for i, (name, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        if lines and len(pts) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{path}"/>')
        else:
            for x, y in pts:
                out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="{color}"/>')
                if labels:
                    out.append(f'<text x="{sx(x) + 6:.1f}" y="{sy(y) - 6:.1f}">{escape(name)}</text>')
        out.append(f'<rect x="{width - right + 10}" y="{top + 16 * i}" width="10" height="10" '
                   f'fill="{color}"/><text x="{width - right + 24}" y="{top + 9 + 16 * i}">'
                   f'{escape(name)}</text>')
    return "\n".join(out) + "</svg>"


def html_table(header: list[str], rows: list[list[str]]) -> str:
    """An HTML table; header cells are escaped here, row cells must already be HTML."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cells) + "</tr>" for cells in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def html_cell(value) -> str:
    return f"<td>{fmt_value(value)}</td>"
