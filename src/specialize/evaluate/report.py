"""The comparison for people: report.html (one self-contained page) and the terminal table.

    write_report(scorecard, "runs/compare/report.html", loss_curve=rows_of_metrics_jsonl,
                 examples={"finetuned": {"test": per_example}, ...})

The page makes no network request (no CDN, no web font, no script), so it opens the same on an
air-gapped machine and can be mailed around. Every piece of data text is HTML-escaped: model
outputs are untrusted. Sections: recommendation, cost, per split (metric table, metric bars,
error categories, confusion matrices), quality vs cost scatter plots, loss curve, and the worst
examples of each error category with every system's prediction side by side. The scorecard
is a `scorecard.Scorecard`, or its JSON as read from scorecard.json.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from html import escape
from pathlib import Path

from rich.table import Table

from specialize.evaluate.charts import COLORS, CSS, chart, html_cell, html_table
from specialize.evaluate.error_analysis import CATEGORIES
from specialize.evaluate.scorecard import Scorecard, SystemScore, common_splits, main_metric
from specialize.files import write_atomic

# Columns of the terminal table, after the main metric.
TABLE_METRICS = ("exact_match", "f1", "field_f1", "accuracy", "macro_f1", "rouge_l", "judge_score",
                 "hallucination_rate", "stop_rate")
# table column order; other numeric metrics follow alphabetically
METRIC_ORDER = ("exact_match", "f1", "field_f1", "rouge_l", "accuracy", "macro_f1", "json_valid",
                "stop_rate", "repetition_rate", "hallucination_rate", "mean_length",
                "length_ratio", "prompt_tokens_per_example", "tool_calls_per_example", "n")
# not on the 0-1 scale: no bars for these
NOT_RATES = {"mean_length", "length_ratio", "prompt_tokens_per_example", "tool_calls_per_example", "n"}
# Metrics every task reports that the terminal table leaves to report.html; any other metric a task
# produces (tool_call's, a judge's) gets a column, so a new task's metrics show without a change here.
TERMINAL_SKIPS = {"repetition_rate", "mean_length", "n", "prompt_tokens_per_example", "length_ratio",
                  "off_label_rate", "json_valid"}
MAX_EXAMPLE_CHARS = 600

def retention_changes(retention: Mapping | None) -> list[tuple[str, float | None, float | None]]:
    """(label, before, after) for every score in a run's retention record.

    finetune writes one entry per retention set, `{"held-out documents": {"kind": "perplexity",
    "before": 64.7, "after": 71.2, ...}}` (label: "held-out documents perplexity"); "before" and
    "after" may also hold the scores, at any depth (`{"before": {"perplexity": 9.1}, "after": {...}}`:
    label "perplexity"). Other numbers (change, counts) are left out: they follow from the pair.
    """
    found: dict[str, dict[str, float]] = {}

    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    def walk(node, path: tuple[str, ...]) -> None:
        if isinstance(node, Mapping) and (number(node.get("before")) or number(node.get("after"))):
            label = " ".join(path + ((node["kind"],) if isinstance(node.get("kind"), str) else ()))
            found[label] = {k: float(node[k]) for k in ("before", "after") if number(node.get(k))}
        elif isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, path + (str(key),))
        elif number(node):
            when = next((p for p in path if p in ("before", "after")), None)
            if when:
                label = " ".join(p for p in path if p not in ("before", "after"))
                found.setdefault(label, {})[when] = float(node)

    walk(retention or {}, ())
    return [(label, v.get("before"), v.get("after")) for label, v in found.items()]


def retention_text(retention: Mapping | None) -> str:
    """One item per score: `held-out documents perplexity 64.7 -> 71.2 (+10%)`; empty when none was measured."""
    def num(x: float | None) -> str:
        return "?" if x is None else f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"

    items = []
    for label, before, after in retention_changes(retention):
        change = f" ({after / before - 1:+.0%})" if before and after is not None else ""
        items.append(f"{label} {num(before)} -> {num(after)}{change}")
    return "; ".join(items)


def _bars(metrics: list[str], systems: list[SystemScore], split: str) -> str:
    """Grouped horizontal bars on a 0-1 scale: one group per metric, one bar per system."""
    bar, gap, left, bar_max = 12, 10, 140, 360
    group = bar * len(systems) + gap
    height = max(group * len(metrics), 16 * len(systems)) + 20
    legend_x = left + bar_max + 60
    out = [f'<svg width="{legend_x + 150}" height="{height}" role="img">']
    for s_i, system in enumerate(systems):
        out.append(f'<rect x="{legend_x}" y="{10 + 16 * s_i}" width="10" height="10" '
                   f'fill="{COLORS[s_i % len(COLORS)]}"/><text x="{legend_x + 14}" '
                   f'y="{19 + 16 * s_i}">{escape(system.name)}</text>')
    for m_i, metric in enumerate(metrics):
        y0 = 10 + m_i * group
        out.append(f'<text x="{left - 6}" y="{y0 + bar * len(systems) / 2 + 4}" '
                   f'text-anchor="end">{escape(metric)}</text>')
        for s_i, system in enumerate(systems):
            value = system.splits.get(split, {}).get(metric)
            if not isinstance(value, (int, float)):
                continue
            length = max(0.0, min(1.0, value)) * bar_max
            out.append(f'<rect x="{left}" y="{y0 + s_i * bar}" width="{length:.1f}" '
                       f'height="{bar - 2}" fill="{COLORS[s_i % len(COLORS)]}">'
                       f'<title>{escape(system.name)}: {value:.3f}</title></rect>'
                       f'<text x="{left + length + 4:.1f}" y="{y0 + s_i * bar + bar - 3}">'
                       f'{value:.3f}</text>')
    return "\n".join(out) + "</svg>"


def _text_cell(text: str, tags: list[str] = (), score: float | None = None) -> str:
    if len(text) > MAX_EXAMPLE_CHARS:  # cut before escaping, so no entity is cut in half
        text = text[:MAX_EXAMPLE_CHARS] + " …"
    extra = "".join(f'<span class="tag">{escape(t)}</span>' for t in tags)
    if score is not None:
        extra += f'<span class="tag">score {score:.3f}</span>'
    return f'<td class="text">{escape(text)}{"<br>" + extra if extra else ""}</td>'


def _split_section(split: str, systems: list[SystemScore]) -> list[str]:
    metrics = [s.splits.get(split, {}) for s in systems]
    numeric = {k for m in metrics for k, v in m.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    keys = [k for k in METRIC_ORDER if k in numeric] + sorted(numeric - set(METRIC_ORDER))
    html = [f"<h2>Split: {escape(split)}</h2>",
            html_table(["system", *keys], [[f"<th>{escape(s.name)}</th>", *(html_cell(m.get(k)) for k in keys)]
                                       for s, m in zip(systems, metrics)])]
    rates = [k for k in keys if k not in NOT_RATES]
    if rates:
        html.append(_bars(rates, systems, split))
    if any("error_counts" in m for m in metrics):
        html.append("<h3>Error categories (examples)</h3>")
        html.append(html_table(["system", *CATEGORIES],
                           [[f"<th>{escape(s.name)}</th>",
                             *(html_cell(m.get("error_counts", {}).get(c)) for c in CATEGORIES)]
                            for s, m in zip(systems, metrics)]))
    for s, m in zip(systems, metrics):
        matrix = m.get("confusion_matrix")
        if matrix:
            labels = list(matrix)
            html.append(f"<h3>Confusion matrix: {escape(s.name)} (rows gold, columns predicted)</h3>")
            html.append(html_table(["gold \\ predicted", *labels],
                               [[f"<th>{escape(g)}</th>", *(html_cell(matrix[g].get(p, 0)) for p in labels)]
                                for g in labels]))
    return html


def _cost_scatter(systems: list[SystemScore]) -> list[str]:
    try:
        metric = main_metric(systems)
    except ValueError:
        return []
    splits = common_splits(systems)
    if not splits:
        return []
    html = [f"<h2>Quality vs cost</h2><p>Quality: {escape(metric)} averaged over "
            f"{escape(', '.join(splits))}.</p>"]
    for key, label in (("prompt_tokens_per_example", "prompt tokens per example"),
                       ("latency_s_per_example", "latency per example (s)")):
        series = {s.name: [(float(getattr(s, key)), sum(s.splits[p][metric] for p in splits) / len(splits))]
                  for s in systems if isinstance(getattr(s, key), (int, float))}
        html.append(chart(series, label, metric, lines=False, labels=True, y_range=(0.0, 1.0)))
    return html


def _loss_section(loss_curve: list[dict]) -> list[str]:
    series: dict[str, list[tuple[float, float]]] = {}
    for i, row in enumerate(loss_curve):
        x = row.get("step", i)
        for key, value in row.items():
            if "loss" in key and isinstance(value, (int, float)) and math.isfinite(value):
                series.setdefault(key, []).append((float(x), float(value)))
    if not series:
        return []
    return ["<h2>Loss curve</h2>", chart(series, "optimizer step", "loss", lines=True)]


# Preference and reward objectives' rows of metrics.jsonl (TRL's names), one chart per scale.
TRAINING_CHARTS = (
    ("Rewards", "reward", lambda k: k == "reward" or (k.startswith("rewards/") and k != "rewards/accuracies")),
    ("KL to the reference", "KL per token", lambda k: k == "kl"),
    ("Completion length", "tokens", lambda k: k == "completions/mean_length"),
    ("Shares", "share", lambda k: k in ("rewards/accuracies", "completions/clipped_ratio", "frac_reward_zero_std")),
)


def _training_section(loss_curve: list[dict]) -> list[str]:
    """Rewards, KL and completion lengths against the step (DPO/ORPO/KTO/GRPO runs log them)."""
    html = []
    for title, y_label, wanted in TRAINING_CHARTS:
        series: dict[str, list[tuple[float, float]]] = {}
        for row in loss_curve:
            for key, value in row.items():
                if "step" in row and wanted(key) and isinstance(value, (int, float)) and math.isfinite(value):
                    series.setdefault(key, []).append((float(row["step"]), float(value)))
        if series:
            html += [f"<h3>{escape(title)}</h3>", chart(series, "optimizer step", y_label, lines=True)]
    return (["<h2>Training signals</h2>"] + html) if html else []


def _examples_section(examples: dict, per_category: int) -> list[str]:
    """Worst examples per category: shared by most systems first, then lowest mean score."""
    names = list(examples)
    splits = list(dict.fromkeys(split for by_split in examples.values() for split in by_split))
    html = ["<h2>Worst examples per error category</h2>"]
    for split in splits:
        rows_by_system = {n: {ex["index"]: ex for ex in examples[n].get(split, [])} for n in names}
        indices = sorted({i for rows in rows_by_system.values() for i in rows})
        for category in CATEGORIES[1:]:  # every category but "correct"
            hits = []
            for i in indices:
                exs = [rows_by_system[n].get(i) for n in names]
                count = sum(1 for ex in exs if ex and category in ex["categories"])
                if count:
                    scores = [ex.get("score", 0.0) for ex in exs if ex]
                    hits.append((-count, sum(scores) / len(scores), i, exs))
            if not hits:
                continue
            hits.sort(key=lambda h: h[:3])
            html.append(f"<h3>{escape(split)}: {escape(category)} ({len(hits)} examples)</h3>")
            rows = []
            for _, _, i, exs in hits[:per_category]:
                first = next(ex for ex in exs if ex)
                refs = first["reference"]
                ref = " | ".join(refs) if isinstance(refs, list) else str(refs)
                rows.append([html_cell(i), _text_cell(first.get("question", "")), _text_cell(ref),
                             *(_text_cell(ex["prediction"], ex["categories"], ex.get("score"))
                               if ex else "<td>–</td>" for ex in exs)])
            html.append(html_table(["#", "question", "reference", *names], rows))
    return html if len(html) > 1 else []


def write_report(scorecard: Scorecard | Mapping, out_path: str | Path, loss_curve: list[dict] | None = None,
                 examples: dict | None = None, *, per_category: int = 5) -> Path:
    """Write report.html and return its path.

    Args:
        scorecard: a `Scorecard`, or its JSON.
        out_path: file to write (atomically); parent folders are created.
        loss_curve: rows of metrics.jsonl; every numeric key containing "loss" is plotted
            against "step", and rewards, KL and completion lengths when the objective logs them.
        examples: {system name: {split: per_example list from `evaluate.score`}}.
        per_category: worst examples shown per error category and split.
    """
    scorecard = Scorecard.model_validate(scorecard)
    systems = scorecard.systems
    title = "specialize report" + (f": {scorecard.task}" if scorecard.task else "")
    html = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}'
            f"</title><style>{CSS}</style></head><body><h1>{escape(title)}</h1>"]
    rec = scorecard.recommendation
    if rec:
        reasons = "".join(f"<li>{escape(r)}</li>" for r in rec.reasons)
        html.append(f'<div class="rec"><h2>Recommendation: {escape(rec.system)}</h2>'
                    f"<ul>{reasons}</ul></div>")
    html.append("<h2>Cost</h2>")
    agents = any(s.tool_calls_per_example is not None for s in systems)
    retained = any(s.retention for s in systems)
    html.append(html_table(
        ["system", "prompt tokens / example", *(["tool calls / example"] if agents else []), "latency s / example",
         "training s", "training tokens", *(["retention (before -> after)"] if retained else [])],
        [[f"<th>{escape(s.name)}</th>", html_cell(s.prompt_tokens_per_example),
          *([html_cell(s.tool_calls_per_example)] if agents else []), html_cell(s.latency_s_per_example),
          html_cell(s.training.seconds if s.training else None), html_cell(s.training.tokens if s.training else None),
          *([_text_cell(retention_text(s.retention))] if retained else [])]
         for s in systems]))
    if retained:
        html.append("<p>Retention: the run's scores on general data before and after fine-tuning "
                    "(perplexity: lower is better; F1: higher is better): what fine-tuning made it forget.</p>")
    splits = list(dict.fromkeys(split for s in systems for split in s.splits))
    for split in splits:
        html.extend(_split_section(split, systems))
    if systems:
        html.extend(_cost_scatter(systems))
    if loss_curve:
        html.extend(_loss_section(loss_curve))
        html.extend(_training_section(loss_curve))
    if examples:
        html.extend(_examples_section(examples, per_category))
    html.append("</body></html>\n")
    return write_atomic(out_path, "\n".join(html))


def scorecard_table(scorecard: Scorecard | Mapping) -> Table:
    """The terminal summary: one row per system and split with quality, hallucination, stop rate, cost."""
    scorecard = Scorecard.model_validate(scorecard)
    systems = scorecard.systems
    try:
        first = main_metric(systems)
    except ValueError:
        first = None
    present = {k for s in systems for m in s.splits.values() for k, v in m.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    metrics = [first] * bool(first) + [k for k in TABLE_METRICS if k in present and k != first]
    metrics += sorted(present - set(metrics) - TERMINAL_SKIPS)  # e.g. tool_call's metrics, tool_calls_per_example
    retained = any(s.retention for s in systems)
    table = Table(title=f"compare ({scorecard.task})")
    for column in ("system", "split", *metrics, "prompt tok/ex", "latency s/ex", "train s",
                   *(["retention"] if retained else [])):
        table.add_column(column, justify="left" if column in ("system", "split", "retention") else "right")
    for s in systems:
        for split, m in s.splits.items():
            cells = [f"{m[k]:.3f}" if isinstance(m.get(k), float) else str(m[k]) if isinstance(m.get(k), int)
                     else "-" for k in metrics]
            # per split when measured there (an agent searches more on one split than another)
            tokens = m.get("prompt_tokens_per_example", s.prompt_tokens_per_example)
            latency = s.latency_s_per_example
            train_s = s.training.seconds if s.training else None
            table.add_row(s.name, split, *cells, "-" if tokens is None else f"{tokens:.0f}",
                          "-" if latency is None else f"{latency:.3f}",
                          "-" if train_s is None else f"{train_s:.0f}",
                          *([retention_text(s.retention) or "-"] if retained else []))
    return table
