"""Task types pick the metrics: `score(task, rows)` turns predictions into metrics + error analysis.

A row is one prediction with its reference(s):

    {"prediction": "Paris", "reference": "Paris" | ["Paris", "paris, France"],
     "stopped": true,            # optional: generation ended at EOS
     "context": "...",           # optional: retrieved passages shown to the model
     "question": "..."}          # optional: the prompt's question

Metrics per task (all means over rows, 0-1 scale, except `mean_length` in words and `n`):

| task     | task metrics                                                     |
| -------- | ---------------------------------------------------------------- |
| qa       | exact_match, f1, rouge_l                                         |
| classify | accuracy, macro_f1 (gold classes), off_label_rate, confusion_matrix |
| extract  | JSON targets: exact_match, field_f1, json_valid; else exact_match, f1 |
| generate | rouge_l, length_ratio (prediction words / reference words, summed)  |
| tool_call | field_f1, exact_match, tool_name_accuracy, arguments_exact_match, json_valid, call_precision, call_recall, answer_f1 |

tool_call rows hold the assistant turn as the model writes it: text and/or `<tool_call>` blocks
(`specialize.tools`; Llama 3.1's bare JSON call is read too). `field_f1` scores names and
arguments together (`metrics.call_fields`) and is 1.0 for a row where neither side calls;
`tool_name_accuracy` and `arguments_exact_match` are over rows whose reference calls;
`json_valid` over rows where the model attempted a call (a malformed block is an attempt);
`call_precision`/`call_recall` say whether the model called when it should and answered directly
when it should not; `answer_f1` is the text F1 of rows answered without a call. A metric with no
row to average over is left out.

and for every task: repetition_rate, hallucination_rate (not classify or tool_call), mean_length, n,
stop_rate (only when rows carry `stopped`), error_counts. Extract targets are JSON when every
row's first reference parses as a JSON object.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from specialize.errors import UserError
from specialize.evaluate import error_analysis as ea
from specialize.evaluate import metrics as m

TASKS = ("qa", "classify", "extract", "generate", "tool_call")


def _row_error(message: str, path: str | Path | None, line: int | None,
               field: str | None = None) -> UserError:
    """A UserError at file:line, or at "row N" for rows passed in memory (no file to name)."""
    if path is not None:
        return UserError(message, path=path, line=line, field=field)
    error = UserError(f"row {line}: " + (f"field '{field}': " if field else "") + message)
    error.line, error.field = line, field
    return error


def _check_row(row: Any, path: str | Path | None, line: int | None) -> dict:
    """A validated copy of one row; a reference object (extract) becomes its JSON text."""
    if not isinstance(row, dict):
        raise _row_error("each row must be a JSON object with 'prediction' and 'reference'",
                         path, line)
    for key in ("prediction", "reference"):
        if key not in row:
            raise _row_error("missing; each row needs 'prediction' and 'reference'",
                             path, line, key)
    row = dict(row)
    if not isinstance(row["prediction"], str):
        raise _row_error("must be a string", path, line, "prediction")
    reference = row["reference"]
    if isinstance(reference, dict):
        reference = json.dumps(reference, ensure_ascii=False)
    if isinstance(reference, str):
        reference = [reference]
    if (not isinstance(reference, list) or not reference
            or not all(isinstance(r, str) for r in reference)):
        raise _row_error("must be a string, a non-empty list of strings, or a JSON object",
                         path, line, "reference")
    row["reference"] = reference
    if "stopped" in row and not isinstance(row["stopped"], bool):
        raise _row_error("must be true or false", path, line, "stopped")
    for key in ("context", "question"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise _row_error("must be a string", path, line, key)
    return row


def load_predictions(path: str | Path) -> list[dict]:
    """Rows of a predictions JSONL file; blank lines are skipped, unknown keys kept.

    Raises:
        UserError: naming the file, line and field of the first bad row.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError("predictions file not found", path=path)
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"not valid JSON ({e.msg} at column {e.colno})",
                                path=path, line=line_no) from None
            rows.append(_check_row(obj, path, line_no))
    if not rows:
        raise UserError("no predictions in the file", path=path)
    return rows


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def score(task: str, rows: list[dict]) -> tuple[dict, list[dict]]:
    """Metrics of a test set and the per-example scores and error categories.

    Args:
        task: one of TASKS.
        rows: dicts with `prediction` and `reference` (str or list of str), optional `stopped`,
            `context`, `question` (see the module docstring).

    Returns:
        (metrics, per_example). per_example[i] has `index`, `prediction`, `reference`,
        `question` (if given), the task's per-example scores, `score` (the task's main
        per-example score, for ranking the worst examples), `length` and `categories`.
    """
    if task not in TASKS:
        raise UserError(f"unknown task '{task}'; choose one of {', '.join(TASKS)}", field="task")
    rows = [_check_row(row, None, i + 1) for i, row in enumerate(rows)]
    if not rows:
        raise UserError("nothing to score: the test set is empty")
    json_targets = task == "extract" and all(
        m.parse_json_object(row["reference"][0]) is not None for row in rows)
    gold_labels = {m.normalize_label(ref) for row in rows for ref in row["reference"]}

    per_example = []
    for i, row in enumerate(rows):
        pred, refs = row["prediction"], row["reference"]
        ex: dict[str, Any] = {"index": i, "prediction": pred, "reference": refs}
        if row.get("question") is not None:
            ex["question"] = row["question"]
        flags = {"repetitive": ea.is_repetitive(pred)}
        if "stopped" in row:
            flags["never_stopped"] = not row["stopped"]
        length = m.word_count(pred)
        flags["too_long"] = ea.is_too_long(length, max(m.word_count(r) for r in refs))

        if task == "classify":
            label = m.normalize_label(pred)
            ex["label"] = label
            ex["accuracy"] = float(label in {m.normalize_label(r) for r in refs})
            ex["score"] = ex["accuracy"]
            match, partial = bool(ex["accuracy"]), False
            flags["bad_format"] = label not in gold_labels
        elif task == "tool_call":
            scores = max((m.tool_call_scores(pred, ref) for ref in refs),
                         key=lambda s: (s["exact_match"], s["field_f1"]))
            ex.update(scores)
            ex["score"] = ex["field_f1"]
            match, partial = bool(ex["exact_match"]), ex["field_f1"] > 0 or ex.get("answer_f1", 0) > 0
            flags["bad_format"] = scores["invalid"] > 0
        elif json_targets:
            ex["json_valid"] = float(m.parse_json_object(pred) is not None)
            ex["field_f1"] = m.best_field_f1(pred, refs)
            ex["exact_match"] = float(ex["field_f1"] == 1.0 and bool(ex["json_valid"]))
            ex["score"] = ex["field_f1"]
            match, partial = bool(ex["exact_match"]), ex["field_f1"] > 0
            flags["bad_format"] = not ex["json_valid"]
        elif task in ("qa", "extract"):
            ex["exact_match"] = m.exact_match(pred, refs)
            ex["f1"] = m.token_f1(pred, refs)
            if task == "qa":
                ex["rouge_l"] = m.rouge_l(pred, refs)
            ex["score"] = ex["f1"]
            match, partial = bool(ex["exact_match"]), ex["f1"] > 0
        else:  # generate
            ex["rouge_l"] = m.rouge_l(pred, refs)
            ex["score"] = ex["rouge_l"]
            match = ex["rouge_l"] >= ea.GENERATE_CORRECT_ROUGE
            partial = ex["rouge_l"] >= ea.GENERATE_PARTLY_ROUGE

        if task not in ("classify", "tool_call"):
            sources = refs + [row[k] for k in ("context", "question") if row.get(k)]
            ex["unsupported_share"] = ea.unsupported_share(pred, sources)
            # an exact match restates the reference, whatever the word-level check says
            flags["unsupported"] = (ex["unsupported_share"] > ea.UNSUPPORTED_SHARE
                                    and not ex.get("exact_match"))
        ex["length"] = length
        ex["flags"] = flags
        ex["categories"] = ea.categorize(match=match, partial=partial, flags=flags)
        per_example.append(ex)

    return _aggregate(task, rows, per_example, json_targets), per_example


def _aggregate(task: str, rows: list[dict], per_example: list[dict], json_targets: bool) -> dict:
    """Set-level metrics from the per-example entries (flags are dropped from them here)."""
    flags = [ex.pop("flags") for ex in per_example]
    out: dict[str, Any] = {}
    if task == "classify":
        # a row with several acceptable labels counts as its first label unless another matched
        gold = []
        for row, ex in zip(rows, per_example):
            refs = [m.normalize_label(r) for r in row["reference"]]
            gold.append(ex["label"] if ex["label"] in refs else refs[0])
        out.update(m.classification_metrics(gold, [ex["label"] for ex in per_example]))
    elif task == "tool_call":
        out.update(_tool_call_metrics(per_example))
    else:
        keys = {"qa": ("exact_match", "f1", "rouge_l"), "generate": ("rouge_l",)}.get(task)
        if keys is None:
            keys = ("exact_match", "field_f1", "json_valid") if json_targets else ("exact_match", "f1")
        for key in keys:
            out[key] = _mean([ex[key] for ex in per_example])
    if task == "generate":
        ref_words = sum(m.word_count(row["reference"][0]) for row in rows)
        pred_words = sum(ex["length"] for ex in per_example)
        out["length_ratio"] = pred_words / ref_words if ref_words else 0.0
    if all("stopped" in row for row in rows):
        out["stop_rate"] = _mean([float(row["stopped"]) for row in rows])
    out["repetition_rate"] = _mean([float(f["repetitive"]) for f in flags])
    if task not in ("classify", "tool_call"):
        out["hallucination_rate"] = _mean([float(f["unsupported"]) for f in flags])
    out["mean_length"] = _mean([float(ex["length"]) for ex in per_example])
    out["n"] = len(per_example)
    out["error_counts"] = ea.count_categories(per_example)
    return out


def _tool_call_metrics(per_example: list[dict]) -> dict:
    """tool_call's set-level metrics; each over the rows it is defined on (see the module docstring)."""
    should = [ex for ex in per_example if ex["should_call"]]
    called = [ex for ex in per_example if ex["called"]]
    direct = [ex for ex in per_example if not ex["should_call"]]
    both = sum(ex["called"] for ex in should)
    out = {"field_f1": _mean([ex["field_f1"] for ex in per_example]),
           "exact_match": _mean([ex["exact_match"] for ex in per_example])}
    if should:
        out["tool_name_accuracy"] = _mean([ex["tool_name_accuracy"] for ex in should])
        out["arguments_exact_match"] = _mean([ex["arguments_exact_match"] for ex in should])
        out["call_recall"] = both / len(should)
    if called:
        out["json_valid"] = _mean([float(ex["invalid"] == 0) for ex in called])
        out["call_precision"] = both / len(called)
    if direct:
        out["answer_f1"] = _mean([ex["answer_f1"] for ex in direct])
    return out


def detect_task(task: str, references: list[str]) -> str:
    """`tool_call` for the default task (`qa`) when a reference holds a tool call; else `task` unchanged.

    Eval and compare call this with the test set's references (`Example.reference`), so a tool-calling
    test set is scored as one without `--task tool_call`.
    """
    from specialize.tools import scan_tool_calls

    if task == "qa" and any(scan_tool_calls(ref).calls for ref in references):
        return "tool_call"
    return task
