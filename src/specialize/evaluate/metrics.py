"""Per-example metric functions: SQuAD exact match / F1, ROUGE-L, labels, JSON fields.

Functions here score one prediction against one or more references (classification: a list
of labels) on a 0-1 scale; `tasks.score` averages them over a test set. The definitions follow the
reference implementations people quote numbers from, so a number printed by specialize can be
put next to a number from a paper:

- `exact_match` and `f1` are the official SQuAD v2.0 evaluation script's `compute_exact` /
  `compute_f1`, including its `normalize_answer` (lower-case, drop ASCII punctuation, drop the
  articles a/an/the, collapse white space). Like the official script, accents are kept
  ("café" != "cafe") and non-ASCII punctuation (“ ” …) is kept.
- `rouge_l` is the ROUGE-L F-measure of Google's `rouge-score` package with
  `use_stemmer=False`: we compare surface forms, like SQuAD F1 does, so "runs" and "run" differ.
  That tokenizer keeps only `[a-z0-9]` runs, so letters outside ASCII are dropped: ROUGE-L says
  little about non-Latin text (use F1 there).
- labels (classification) are compared after `normalize_label`: strip and case-fold.
- JSON targets are compared as multisets of (key path, normalised value) pairs.
"""

from __future__ import annotations

import collections
import json
import re
import string
from functools import lru_cache

# ---------------------------------------------------------------------------------------------
# SQuAD v2.0 (official evaluation script, same logic and names)
# ---------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (official SQuAD v2.0)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def get_tokens(s: str) -> list[str]:
    """SQuAD tokens: the normalised answer split on white space."""
    if not s:
        return []
    return normalize_answer(s).split()


def compute_exact(a_gold: str, a_pred: str) -> int:
    """1 if the normalised strings are equal, else 0."""
    return int(normalize_answer(a_gold) == normalize_answer(a_pred))


def compute_f1(a_gold: str, a_pred: str) -> float:
    """Token-overlap F1 (bag of tokens, so repeated tokens count as often as they occur)."""
    gold_toks = get_tokens(a_gold)
    pred_toks = get_tokens(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        # "no answer" on either side: right only if both are empty
        return float(gold_toks == pred_toks)
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_toks)
    recall = num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def gold_answers(references: list[str]) -> list[str]:
    """References as the official script uses them: empty ones dropped, [""] if none is left."""
    kept = [r for r in references if normalize_answer(r)]
    return kept or [""]


def exact_match(prediction: str, references: list[str]) -> float:
    """Max SQuAD exact match over the references."""
    return float(max(compute_exact(g, prediction) for g in gold_answers(references)))


def token_f1(prediction: str, references: list[str]) -> float:
    """Max SQuAD token F1 over the references."""
    return max(compute_f1(g, prediction) for g in gold_answers(references))


# ---------------------------------------------------------------------------------------------
# ROUGE-L (rouge-score package)
# ---------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _rouge_scorer():
    # Imported lazily: rouge_score pulls in nltk and absl, which the training path never needs.
    from rouge_score import rouge_scorer, tokenizers

    # The tokenizer is passed explicitly: built by default, rouge_score logs through absl, whose first
    # log call runs logging.basicConfig() and gives the root logger a stderr handler, after which
    # other libraries' debug records (bm25s logs at DEBUG) print in the user's terminal.
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=tokenizers.DefaultTokenizer(False))


def rouge_l(prediction: str, references: list[str]) -> float:
    """Max ROUGE-L F-measure over the references (rouge-score, no stemming)."""
    scorer = _rouge_scorer()
    return max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


# ---------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------

def normalize_label(label: str) -> str:
    """Labels match after stripping outer white space and case-folding ("Billing " == "billing")."""
    return label.strip().casefold()


def classification_metrics(gold: list[str], predicted: list[str]) -> dict:
    """Accuracy, macro-F1, off-label rate and confusion matrix over already normalised labels.

    Macro-F1 averages per-label F1 over the labels of the gold set (the task's classes), as
    sklearn's `f1_score(average="macro", labels=sorted(set(gold)))` does; a label with no true
    positive has F1 0. A prediction outside that set ("billing." for "billing") is a miss for its
    gold class but not a class of its own: with the union of labels, a few free-text slips would
    each add a zero to the average. `off_label_rate` counts them instead.
    `confusion_matrix[gold][predicted]` is a count over the union of labels, rows and columns sorted.
    """
    classes = sorted(set(gold))
    labels = sorted(set(gold) | set(predicted))
    matrix = {g: {p: 0 for p in labels} for g in labels}
    for g, p in zip(gold, predicted):
        matrix[g][p] += 1
    f1s = []
    for label in classes:
        tp = matrix[label][label]
        fp = sum(matrix[g][label] for g in labels) - tp
        fn = sum(matrix[label].values()) - tp
        # 2tp / (2tp + fp + fn) equals 2PR / (P + R) and is 0, not undefined, when tp == 0
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    correct = sum(g == p for g, p in zip(gold, predicted))
    return {
        "accuracy": correct / len(gold) if gold else 0.0,
        "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
        "off_label_rate": sum(p not in set(classes) for p in predicted) / len(predicted) if predicted else 0.0,
        "confusion_matrix": matrix,
    }


# ---------------------------------------------------------------------------------------------
# JSON field extraction
# ---------------------------------------------------------------------------------------------

def parse_json_object(text: str) -> dict | None:
    """The text as a JSON object, or None. Only outer white space is forgiven (no ``` fences)."""
    try:
        value = json.loads(text.strip())
    except (json.JSONDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def json_fields(obj: dict, prefix: str = "") -> collections.Counter:
    """(key path, normalised value) pairs of a JSON object, as a multiset.

    Nested objects give dotted key paths ("address.city"); each list element is its own pair
    under the list's key, so a keyword list is scored element by element; strings are
    normalised like SQuAD answers; numbers, booleans and null by their JSON text (1 == 1.0).
    """
    pairs: collections.Counter = collections.Counter()
    for key, value in obj.items():
        path = f"{prefix}{key}"
        values = value if isinstance(value, list) else [value]
        for item in values:
            if isinstance(item, dict):
                pairs.update(json_fields(item, prefix=path + "."))
            elif isinstance(item, str):
                pairs[(path, normalize_answer(item))] += 1
            elif isinstance(item, float) and item.is_integer():
                pairs[(path, json.dumps(int(item)))] += 1
            else:
                pairs[(path, json.dumps(item, sort_keys=True))] += 1
    return pairs


def field_f1(prediction: str, reference: str) -> float:
    """F1 of (key, value) pairs between two JSON objects; invalid prediction JSON scores 0."""
    gold = json_fields(parse_json_object(reference) or {})
    pred_obj = parse_json_object(prediction)
    pred = json_fields(pred_obj) if pred_obj is not None else collections.Counter()
    if not gold or not pred:
        return float(not gold and not pred and pred_obj is not None)
    same = sum((gold & pred).values())
    if same == 0:
        return 0.0
    precision = same / sum(pred.values())
    recall = same / sum(gold.values())
    return 2 * precision * recall / (precision + recall)


def best_field_f1(prediction: str, references: list[str]) -> float:
    """Max field F1 over the references."""
    return max(field_f1(prediction, ref) for ref in references)


# ---------------------------------------------------------------------------------------------
# Length
# ---------------------------------------------------------------------------------------------

def word_count(text: str) -> int:
    """Words separated by white space: the unit of every length metric."""
    return len(text.split())


# ---------------------------------------------------------------------------------------------
# Tool calls (task tool_call): the model's output and the reference are read by the one parser,
# `specialize.tools.scan_tool_calls`, so a call counts exactly when the server would run it.
# ---------------------------------------------------------------------------------------------

def _call_key(call: dict) -> tuple[str, str]:
    from specialize.tools import call_arguments

    name, arguments = call_arguments(call)
    return name, json.dumps(arguments, sort_keys=True, ensure_ascii=False)


def call_fields(calls: list[dict]) -> collections.Counter:
    """(path, value) pairs of calls as a multiset: `(name, "<called>")` per call, then each argument under
    `name.key` (normalised as in `json_fields`), so names and arguments both count."""
    from specialize.tools import call_arguments

    pairs: collections.Counter = collections.Counter()
    for call in calls:
        name, arguments = call_arguments(call)
        pairs[(name, "<called>")] += 1
        if isinstance(arguments, dict):
            pairs.update(json_fields(arguments, prefix=name + "."))
    return pairs


def tool_call_scores(prediction: str, reference: str) -> dict:
    """One prediction against one reference turn (text and/or `<tool_call>` blocks).

    Returns `should_call`/`called` (a malformed call block counts as a call attempted), `invalid`
    (malformed blocks), `tool_name_accuracy` and `arguments_exact_match` (the calls as multisets;
    only when the reference calls), `field_f1` (F1 of `call_fields`; 1.0 when neither side calls),
    and `exact_match` (the calls match exactly, or neither calls and the texts match as SQuAD does).
    """
    from specialize.tools import scan_tool_calls

    pred, ref = scan_tool_calls(prediction), scan_tool_calls(reference)
    should_call, called = bool(ref.calls), bool(pred.calls or pred.invalid)
    out: dict = {"should_call": should_call, "called": called, "invalid": len(pred.invalid)}
    gold, got = call_fields(ref.calls), call_fields(pred.calls)
    same = sum((gold & got).values())
    if not gold and not got:
        out["field_f1"] = float(not pred.invalid)
    else:
        out["field_f1"] = 0.0 if same == 0 else 2 * same / (sum(gold.values()) + sum(got.values()))
    if should_call:
        names = (lambda calls: sorted(_call_key(c)[0] for c in calls))
        out["tool_name_accuracy"] = float(names(pred.calls) == names(ref.calls))
        exact = sorted(map(_call_key, pred.calls)) == sorted(map(_call_key, ref.calls)) and not pred.invalid
        out["arguments_exact_match"] = float(exact)
        out["exact_match"] = float(exact)
    else:
        out["exact_match"] = float(not called and compute_exact(ref.text, pred.text) == 1)
        out["answer_f1"] = 0.0 if called else compute_f1(ref.text, pred.text)
    return out
