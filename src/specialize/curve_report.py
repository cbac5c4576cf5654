"""The learning curve in words (`summarize`) and as a page (`write_curve_report`).

    curve["summary"] = summarize(curve)
    write_curve_report(curve, "runs/curve/report.html", others={"lora": lora_curve})

The summary answers "would more data help?": the gain per doubling of the examples (a least-squares
slope against log2 of the examples, over every point), whether the curve is still rising (the last
doubling gained more than the seeds disagree at the largest size), and what the next doubling would
likely buy (the last doubling's gain again: an extrapolation, so a guess that is only as good as the
curve is straight on the log axis).

The page is self-contained like compare's report (`evaluate.charts`: its CSS, colours, ticks and
scatter plot): quality against examples on a log axis with the spread over seeds (the band from the
worst to the best seed), retention against quality, and the points with their commands.
"""

from __future__ import annotations

import math
from html import escape
from pathlib import Path
from statistics import mean

from specialize.evaluate.charts import COLORS, CSS, chart, html_cell, html_table, nice_ticks, svg_axes
from specialize.files import write_atomic

METRIC = "f1"


def by_size(points: list[dict], split: str, metric: str = METRIC) -> list[tuple[int, list[float]]]:
    """[(examples, the metric of every seed)], by increasing examples, over the scored points."""
    sizes: dict[int, list[float]] = {}
    for p in points:
        if p.get("scores", {}).get(split, {}).get(metric) is not None:
            sizes.setdefault(p["examples"], []).append(p["scores"][split][metric])
    return sorted(sizes.items())


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of y against log2(x)."""
    lx = [math.log2(x) for x in xs]
    mx, my = mean(lx), mean(ys)
    var = sum((x - mx) ** 2 for x in lx)
    return sum((x - mx) * (y - my) for x, y in zip(lx, ys)) / var if var else 0.0


def split_summary(points: list[dict], split: str) -> dict | None:
    """The numbers behind the words for one split, or None with fewer than two sizes scored."""
    sizes = by_size(points, split)
    if len(sizes) < 2:
        return None
    xs = [n for n, values in sizes for _ in values]
    ys = [v for _, values in sizes for v in values]
    (n_prev, prev), (n_last, last) = sizes[-2], sizes[-1]
    last_gain = (mean(last) - mean(prev)) / math.log2(n_last / n_prev)
    spread = max(last) - min(last)
    rising = last_gain > 0.005 and mean(last) - mean(prev) > spread
    expected = max(0.0, min(last_gain, 1.0 - mean(last)))
    return {"metric": METRIC, "examples": [n for n, _ in sizes], "mean": [mean(v) for _, v in sizes],
            "min": [min(v) for _, v in sizes], "max": [max(v) for _, v in sizes],
            "gain_per_doubling": _slope(xs, ys), "last_doubling_gain": last_gain, "spread_at_largest": spread,
            "still_rising": rising, "next_doubling_examples": 2 * n_last,
            "next_doubling_gain": expected if rising else 0.0,
            "next_doubling_value": mean(last) + (expected if rising else 0.0)}


def summarize(curve: dict) -> dict:
    """curve.json's `summary`: per split the numbers of `split_summary`, and `lines` in words."""
    points = [p for p in curve["points"] if "scores" in p]
    out: dict = {"splits": {}, "lines": []}
    if not points:
        out["lines"].append(f"{len(curve['points'])} point(s) planned, none finished yet: run their commands "
                            "(curve.json), then run curve again to gather")
        return out
    for split in curve["splits"]:
        s = split_summary(points, split)
        if s is None:
            continue
        out["splits"][split] = s
        first, last = s["examples"][0], s["examples"][-1]
        line = (f"{split}: F1 {s['mean'][0]:.2f} at {first:,} examples -> {s['mean'][-1]:.2f} at {last:,}, "
                f"{s['gain_per_doubling']:+.3f} per doubling of the data")
        if s["still_rising"]:
            line += (f"; still rising (the last doubling gained {s['last_doubling_gain']:+.3f}, more than the "
                     f"seeds disagree: {s['spread_at_largest']:.3f}); the next doubling ({s['next_doubling_examples']:,} "
                     f"examples) would likely buy about {s['next_doubling_gain']:+.3f} "
                     f"(to ~{s['next_doubling_value']:.2f}), if the curve stays straight on the log axis")
        else:
            line += (f"; flat at the end (the last doubling: {s['last_doubling_gain']:+.3f}, within the seeds' "
                     f"spread of {s['spread_at_largest']:.3f}): more of the same data is unlikely to help much")
        out["lines"].append(line)
    for name, value in _retention_at_largest(curve).items():
        out["lines"].append(f"retention ({name}): {value}")
    return out


def _retention_at_largest(curve: dict) -> dict[str, str]:
    """Per retention set: the base's score and the mean over seeds at the most examples, in words."""
    scored = [p for p in curve["points"] if p.get("retention")]
    if not scored:
        return {}
    most = max(p["examples"] for p in scored)
    largest = [p for p in scored if p["examples"] == most]
    words = {}
    for name, base in (curve.get("base", {}).get("retention") or {}).items():
        kind = next(iter(base))
        after = [p["retention"][name][kind] for p in largest if name in p["retention"]]
        if after:
            change = mean(after) / base[kind] - 1 if base[kind] else 0.0
            words[name] = (f"{kind} {base[kind]:.3g} for the base, {mean(after):.3g} after fine-tuning on "
                           f"{most:,} examples ({change:+.0%})")
    return words


# --- the page -----------------------------------------------------------------------------------


def log_plot(series: dict[str, list[tuple[int, float, float, float]]], y_label: str) -> str:
    """SVG: y against examples on a log axis; per series a line through the means and a band from the
    lowest to the highest seed. `series`: {name: [(examples, mean, low, high)]}."""
    width, height, left, right, top, bottom = 560, 300, 60, 170, 15, 45
    pts = [p for values in series.values() for p in values]
    if not pts:
        return ""
    x_lo, x_hi = math.log2(min(p[0] for p in pts)), math.log2(max(p[0] for p in pts))
    x_hi = x_hi if x_hi > x_lo else x_lo + 1
    y_lo, y_hi = min(0.0, min(p[2] for p in pts)), max(1e-9, max(p[3] for p in pts))
    y_hi = min(1.0, y_hi * 1.1) if y_hi <= 1 else y_hi * 1.1

    def sx(n: float) -> float:
        return left + (math.log2(n) - x_lo) / (x_hi - x_lo) * (width - left - right)

    def sy(y: float) -> float:
        return height - bottom - (y - y_lo) / ((y_hi - y_lo) or 1) * (height - top - bottom)

    # x ticks at the sizes measured: a log axis labelled in examples
    out = [f'<svg width="{width}" height="{height}" role="img" class="curve">',
           *svg_axes((width, height, left, right, top, bottom),
                     [(sx(n), f"{n:,}") for n in sorted({p[0] for p in pts})],
                     [(sy(t), f"{t:g}") for t in nice_ticks(y_lo, y_hi)], "training examples (log scale)", y_label)]
    for i, (name, values) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        band = [(sx(n), sy(hi)) for n, _, _, hi in values] + [(sx(n), sy(lo)) for n, _, lo, _ in reversed(values)]
        out.append(f'<polygon class="spread" data-series="{escape(name)}" fill="{color}" fill-opacity="0.18" '
                   f'stroke="none" points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in band)}"/>')
        out.append(f'<polyline class="mean" data-series="{escape(name)}" fill="none" stroke="{color}" '
                   f'stroke-width="2" points="{" ".join(f"{sx(n):.1f},{sy(m):.1f}" for n, m, _, _ in values)}"/>')
        for n, m, _, _ in values:
            out.append(f'<circle cx="{sx(n):.1f}" cy="{sy(m):.1f}" r="3" fill="{color}"/>')
        out.append(f'<rect x="{width - right + 10}" y="{top + 16 * i}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{width - right + 24}" y="{top + 9 + 16 * i}">{escape(name)}</text>')
    return "\n".join(out) + "</svg>"


def _series(points: list[dict], split: str) -> list[tuple[int, float, float, float]]:
    return [(n, mean(v), min(v), max(v)) for n, v in by_size(points, split)]


def variant_name(curve: dict, fallback: str) -> str:
    """How a curve is named in the report: its method, and its replay share when it replayed."""
    done = [p for p in curve["points"] if "scores" in p]
    if not done:
        return fallback
    method = done[0].get("method") or fallback
    replay = done[0].get("replay")
    return f"{method} + replay {replay['fraction']:.0%}" if replay else method


def write_curve_report(curve: dict, path: str | Path, others: dict[str, dict] | None = None) -> None:
    """report.html: the summary, quality vs examples per split, retention vs quality, the points."""
    curves = {variant_name(curve, "this curve"): curve}
    for name, other in (others or {}).items():
        label = variant_name(other, name)
        curves[label if label not in curves else f"{label} ({name})"] = other
    body = ["<h1>Learning curve</h1>", '<div class="rec">' + "<br>".join(escape(line) for line in
                                                                          curve["summary"].get("lines", [])) + "</div>"]
    for split in curve["splits"]:
        body.append(f"<h2>{escape(split)}: F1 against training examples</h2>")
        body.append(log_plot({name: _series(c["points"], split) for name, c in curves.items()}, f"{split} F1"))
        body.append("<p>Line: the mean over seeds; band: from the worst seed to the best.</p>")
    body += _retention_section(curves, curve["splits"])
    body += _variants_table(curves, curve["splits"])
    body.append("<h2>Points</h2>")
    header = ["point", "examples", "seed"] + [f"{s} F1" for s in curve["splits"]] + \
             [f"{s} EM" for s in curve["splits"]] + ["retention", "seconds", "command"]
    rows = []
    for p in curve["points"]:
        scores = p.get("scores", {})
        retention = "; ".join(f"{name} {kind} {value:.3g}" for name, row in (p.get("retention") or {}).items()
                              for kind, value in row.items() if kind != "change")
        rows.append([html_cell(p["name"]), html_cell(p["examples"]), html_cell(p["seed"])]
                    + [html_cell(scores.get(s, {}).get("f1")) for s in curve["splits"]]
                    + [html_cell(scores.get(s, {}).get("exact_match")) for s in curve["splits"]]
                    + [html_cell(retention or None), html_cell(p.get("seconds")),
                       f'<td class="text">{escape(" ".join(p.get("command", [])))}</td>'])
    body.append(html_table(header, rows))
    html = ("<!doctype html><html><head><meta charset='utf-8'><title>specialize curve</title>"
            f"<style>{CSS}</style></head><body>" + "\n".join(body) + "</body></html>")
    write_atomic(Path(path), html)


def _retention_section(curves: dict[str, dict], splits: list[str]) -> list[str]:
    """Retention against quality: one scatter per retention set (x: F1 on the first split)."""
    if not splits:
        return []
    out = []
    names = {n for c in curves.values() for p in c["points"] for n in (p.get("retention") or {})}
    for name in sorted(names):
        series, kind, base_point = {}, "perplexity", None
        for label, c in curves.items():
            base = (c.get("base", {}).get("retention") or {}).get(name)
            if base:
                kind = next(iter(base))
                base_point = base_point or [(0.0, base[kind])]
            pts = [(p["scores"][splits[0]]["f1"], p["retention"][name][kind]) for p in c["points"]
                   if "scores" in p and name in (p.get("retention") or {}) and kind in p["retention"][name]]
            if pts:
                series[label] = pts
        if base_point:  # last, so each curve keeps the colour it has in the plots above
            series["base"] = base_point
        out.append(f"<h2>Retention ({escape(name)}) against quality</h2>")
        out.append(chart(series, f"{splits[0]} F1", kind, lines=False))
        out.append(f"<p>Each point is one run; lower {kind} is better" if kind == "perplexity" else
                   f"<p>Each point is one run; higher {kind} is better")
        out[-1] += " (the base is at F1 0). Up and to the right: it learned the task and forgot more.</p>" \
            if kind == "perplexity" else ".</p>"
    return out


def _variants_table(curves: dict[str, dict], splits: list[str]) -> list[str]:
    """Full vs LoRA vs replay at each curve's largest size: mean F1 and retention change."""
    if len(curves) < 2:
        return []
    rows = []
    for label, c in curves.items():
        done = [p for p in c["points"] if "scores" in p]
        if not done:
            continue
        most = max(p["examples"] for p in done)
        largest = [p for p in done if p["examples"] == most]
        retention = {}
        for p in largest:
            for name, row in (p.get("retention") or {}).items():
                retention.setdefault(name, []).append(row["change"])
        rows.append([html_cell(label), html_cell(most)] + [html_cell(mean(p["scores"][s]["f1"] for p in largest)) for s in splits]
                    + [html_cell("; ".join(f"{n} {mean(v):+.3g}" for n, v in retention.items()) or None)])
    return ["<h2>Full vs LoRA vs replay (the largest size, mean over seeds)</h2>",
            html_table(["curve", "examples"] + [f"{s} F1" for s in splits] + ["retention change"], rows)]
