"""Metrics: SQuAD EM/F1 equal the official script, ROUGE-L equals rouge-score, exact numbers."""

import collections
import json
import re
import string
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from specialize.errors import UserError
from specialize.evaluate import load_predictions, score
from specialize.evaluate import error_analysis as ea
from specialize.evaluate import metrics as m

ASSETS = Path(__file__).parent / "assets" / "eval"


# --- Reference: the official SQuAD v2.0 evaluation script's functions, verbatim ---------------
def normalize_answer(s):
  """Lower text and remove punctuation, articles and extra whitespace."""
  def remove_articles(text):
    regex = re.compile(r'\b(a|an|the)\b', re.UNICODE)
    return re.sub(regex, ' ', text)
  def white_space_fix(text):
    return ' '.join(text.split())
  def remove_punc(text):
    exclude = set(string.punctuation)
    return ''.join(ch for ch in text if ch not in exclude)
  def lower(text):
    return text.lower()
  return white_space_fix(remove_articles(remove_punc(lower(s))))

def get_tokens(s):
  if not s: return []
  return normalize_answer(s).split()

def compute_exact(a_gold, a_pred):
  return int(normalize_answer(a_gold) == normalize_answer(a_pred))

def compute_f1(a_gold, a_pred):
  gold_toks = get_tokens(a_gold)
  pred_toks = get_tokens(a_pred)
  common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
  num_same = sum(common.values())
  if len(gold_toks) == 0 or len(pred_toks) == 0:
    # If either is no-answer, then F1 is 1 if they agree, 0 otherwise
    return int(gold_toks == pred_toks)
  if num_same == 0:
    return 0
  precision = 1.0 * num_same / len(pred_toks)
  recall = 1.0 * num_same / len(gold_toks)
  f1 = (2 * precision * recall) / (precision + recall)
  return f1
# --- end of the official functions -------------------------------------------------------------


def official_max(gold_list, pred):
    """get_raw_scores' handling of several gold answers."""
    gold_answers = [a for a in gold_list if normalize_answer(a)] or [""]
    return (max(compute_exact(a, pred) for a in gold_answers),
            max(compute_f1(a, pred) for a in gold_answers))


PAIRS = [  # (gold, prediction)
    ("The Eiffel Tower", "eiffel tower"), ("a cat", "the cat"), ("Paris.", "paris"),
    ("  multiple \t spaces\n", "multiple spaces"), ("", ""), ("", "something"), ("the", ""),
    ("a", "an"), ("café", "cafe"), ("Café", "CAFÉ"), ("“quoted”", "quoted"),
    ("the the cat cat", "cat"), ("apple apple apple", "apple banana apple"), ("theater", "ater"),
    ("an-apple", "an apple"), ("A.B.C.", "abc"), ("don't", "dont"), ("Über die Brücke", "uber die brucke"),
    ("1,000", "1000"), ("Theodore the Great", "theodore great"), ("x y z", "z y x"),
    ("New York City", "the city of New York"), ("ANSWER", "answer!!!"),
]


@pytest.mark.parametrize("gold,pred", PAIRS)
def test_squad_functions_equal_official(gold, pred):
    assert m.normalize_answer(gold) == normalize_answer(gold)
    assert m.compute_exact(gold, pred) == compute_exact(gold, pred)
    assert m.compute_f1(gold, pred) == compute_f1(gold, pred)
    assert (m.exact_match(pred, [gold]), m.token_f1(pred, [gold])) == official_max([gold], pred)


def test_squad_exact_numbers():
    assert m.normalize_answer("  The  Café, an Über-Test!  ") == "café übertest"
    assert m.token_f1("cat", ["the the cat cat"]) == pytest.approx(2 / 3)  # p=1, r=1/2
    assert m.token_f1("apple banana apple", ["apple apple apple"]) == pytest.approx(2 / 3)
    assert m.exact_match("cafe", ["café"]) == 0.0  # accents are not stripped
    assert m.exact_match("", [""]) == 1.0 and m.token_f1("", ["the"]) == 1.0
    assert m.token_f1("something", [""]) == 0.0


def test_squad_multiple_references_like_official():
    refs = ["", "the", "Lyon, France", "Lyon"]
    for pred in ["Lyon", "lyon france", "", "Paris", "the city of Lyon"]:
        assert (m.exact_match(pred, refs), m.token_f1(pred, refs)) == official_max(refs, pred)
    assert m.token_f1("the city of Lyon", refs) == 0.5  # vs "Lyon": p=1/3, r=1
    assert m.exact_match("", ["", "the"]) == 1.0  # all references empty -> [""]


@pytest.mark.parametrize("ref,pred", [
    ("the cat sat on the mat", "the cat on the mat"), ("Café naïve", "cafe naive"),
    ("a b a b a b", "a a a"), ("", "something"), ("Dear Ann,\nthanks!", "dear ann thanks"),
    ("running runs", "run running"),
])
def test_rouge_l_equals_rouge_score_package(ref, pred):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    assert m.rouge_l(pred, [ref]) == scorer.score(ref, pred)["rougeL"].fmeasure


def test_rouge_l_exact_numbers():
    assert m.rouge_l("the cat on the mat", ["the cat sat on the mat"]) == pytest.approx(10 / 11)
    assert m.rouge_l("run", ["runs"]) == 0.0  # no stemming
    assert m.rouge_l("x", ["y", "x"]) == 1.0  # max over references


def test_classification_by_hand():
    # gold classes a, b, c; F1: a 2/3 (tp1 fn1), b 2/3 (tp1 fp1), c 0 -> macro 4/9; "d" is off-label
    out = m.classification_metrics(["a", "a", "b", "c"], ["a", "b", "b", "d"])
    assert out["accuracy"] == 0.5
    assert out["macro_f1"] == pytest.approx(4 / 9)
    assert out["off_label_rate"] == 0.25
    assert out["confusion_matrix"] == {
        "a": {"a": 1, "b": 1, "c": 0, "d": 0}, "b": {"a": 0, "b": 1, "c": 0, "d": 0},
        "c": {"a": 0, "b": 0, "c": 0, "d": 1}, "d": {"a": 0, "b": 0, "c": 0, "d": 0}}


def test_score_classify_normalises_labels():
    rows = [{"prediction": " Billing", "reference": "billing"},
            {"prediction": "BILLING\n", "reference": "Refund"},
            {"prediction": "refund", "reference": "refund"},
            {"prediction": "Refund.", "reference": "shipping"}]
    metrics, per = score("classify", rows)
    # gold classes billing, refund, shipping: F1 billing 2/3, refund 2/3, shipping 0; "refund." is off-label
    assert metrics["accuracy"] == 0.5
    assert metrics["macro_f1"] == pytest.approx(4 / 9)
    assert metrics["off_label_rate"] == 0.25
    assert metrics["confusion_matrix"]["refund"] == {"billing": 1, "refund": 1, "refund.": 0, "shipping": 0}
    assert [e["categories"] for e in per] == [["correct"], ["wrong"], ["correct"], ["wrong", "bad_format"]]
    assert set(metrics) == {"accuracy", "macro_f1", "off_label_rate", "confusion_matrix", "repetition_rate",
                            "mean_length", "n", "error_counts"}


def test_field_f1_by_hand():
    gold = json.dumps({"name": "Ann Lee", "tags": ["x", "y"], "addr": {"city": "Oslo"}})
    pred = json.dumps({"name": "ann lee", "tags": ["x"], "addr": {"city": "Bergen"}, "extra": 1})
    assert m.field_f1(pred, gold) == 0.5  # 2 of 4 pairs each way
    assert m.field_f1('{"n": 1.0}', '{"n": 1}') == 1.0
    assert m.field_f1('```json\n{"n": 1}\n```', '{"n": 1}') == 0.0  # fences are a format error
    assert m.field_f1("{}", "{}") == 1.0 and m.field_f1("[]", "{}") == 0.0


def test_score_extract_json_and_text():
    rows = [{"prediction": '{"name": "Ann", "age": 3}', "reference": {"name": "ann", "age": 3}},
            {"prediction": '{"name": "Bo", "age": 4}', "reference": '{"name": "Bo", "age": 5}'},
            {"prediction": "name: Cy", "reference": '{"name": "Cy"}'}]
    metrics, per = score("extract", rows)
    assert metrics["exact_match"] == pytest.approx(1 / 3)
    assert metrics["field_f1"] == pytest.approx(0.5)  # (1 + 0.5 + 0) / 3
    assert metrics["json_valid"] == pytest.approx(2 / 3)
    assert per[2]["categories"] == ["wrong", "bad_format"]
    assert "f1" not in metrics
    text_metrics, _ = score("extract", [{"prediction": "os.path.join", "reference": "os.path.join"},
                                        {"prediction": "join", "reference": "os.path.join"}])
    assert set(text_metrics) >= {"exact_match", "f1"} and "field_f1" not in text_metrics
    assert text_metrics["exact_match"] == 0.5 and text_metrics["f1"] == 0.5


def test_score_generate():
    rows = [{"prediction": "a b c d e f", "reference": "a b c d e", "stopped": True},
            {"prediction": "g h i j", "reference": " ".join("klmnopqrstuvwxy"), "stopped": True}]
    metrics, _ = score("generate", rows)
    assert metrics["length_ratio"] == 0.5  # 10 words / 20 words
    assert metrics["rouge_l"] == pytest.approx((10 / 11) / 2)
    assert metrics["mean_length"] == 5.0 and metrics["stop_rate"] == 1.0
    assert set(metrics) == {"rouge_l", "length_ratio", "stop_rate", "repetition_rate",
                            "hallucination_rate", "mean_length", "n", "error_counts"}


def test_score_qa_from_file():
    metrics, per = score("qa", load_predictions(ASSETS / "predictions.jsonl"))
    assert metrics["n"] == 3
    assert metrics["exact_match"] == pytest.approx(1 / 3)
    assert metrics["f1"] == pytest.approx(0.5)  # (1 + 0.5 + 0) / 3
    assert per[1]["f1"] == 0.5  # "city of lyon" vs "lyon": p=1/3, r=1; vs "lyon france": 0.4
    assert metrics["stop_rate"] == pytest.approx(2 / 3)
    assert metrics["repetition_rate"] == pytest.approx(1 / 3)
    assert metrics["hallucination_rate"] == pytest.approx(1 / 3)
    assert metrics["mean_length"] == pytest.approx(11 / 3)
    assert per[1]["question"] == "Which city?"
    assert [e["categories"] for e in per] == [
        ["correct"], ["partly_right"], ["wrong", "repetitive", "never_stopped", "unsupported"]]
    assert metrics["error_counts"] == {"correct": 1, "partly_right": 1, "wrong": 1, "too_long": 0,
                                       "repetitive": 1, "never_stopped": 1, "bad_format": 0,
                                       "unsupported": 1}
    assert set(metrics) == {"exact_match", "f1", "rouge_l", "stop_rate", "repetition_rate",
                            "hallucination_rate", "mean_length", "n", "error_counts"}


def test_repetition_rule():
    assert ea.is_repetitive("a b c d a b c d a b c d")  # one 4-gram three times
    assert not ea.is_repetitive("a b c d a b c d")
    assert ea.is_repetitive("no no no no no no")  # "no no no no" at 0, 1, 2


def test_hallucination_proxy():
    pred = "Paris is the capital of France."
    assert ea.content_words(pred) == ["paris", "capital", "france"]
    assert ea.unsupported_share(pred, ["Paris"]) == pytest.approx(2 / 3)
    assert ea.unsupported_share(pred, ["Paris", "France's capital city is Paris."]) == 0.0
    assert ea.unsupported_share("dont", ["don't"]) == 0.0  # SQuAD-style punctuation drop
    assert ea.unsupported_share("it is the one", ["x"]) == 0.0  # only stop words: nothing claimed
    rows = [{"prediction": pred, "reference": "Paris", "context": "France's capital is Paris."},
            {"prediction": pred, "reference": "Paris"}]
    metrics, per = score("qa", rows)
    assert metrics["hallucination_rate"] == 0.5
    assert per[1]["categories"] == ["partly_right", "unsupported"]


def test_categories_rules():
    assert ea.categorize(match=True, partial=True, flags={"too_long": True}) == ["correct", "too_long"]
    assert ea.categorize(match=True, partial=True, flags={"never_stopped": True}) == [
        "partly_right", "never_stopped"]
    assert ea.categorize(match=False, partial=False, flags={"repetitive": True, "bad_format": True}) == [
        "wrong", "repetitive", "bad_format"]
    _, per = score("qa", [{"prediction": "Paris " + "and more words " * 5, "reference": "Paris"}])
    assert per[0]["categories"] == ["partly_right", "too_long", "repetitive", "unsupported"]


def test_load_predictions_errors(tmp_path):
    cases = {
        '{"prediction": "x", "reference": "y"}\n{"prediction": "x"\n': ("bad.jsonl:2", None),
        '{"prediction": "x"}\n': ("bad.jsonl:1", "reference"),
        '{"prediction": 3, "reference": "y"}\n': ("bad.jsonl:1", "prediction"),
        '\n{"prediction": "x", "reference": []}\n': ("bad.jsonl:2", "reference"),
        '{"prediction": "x", "reference": "y", "stopped": "yes"}\n': ("bad.jsonl:1", "stopped"),
        '["x", "y"]\n': ("bad.jsonl:1", None),
    }
    path = tmp_path / "bad.jsonl"
    for text, (where, field) in cases.items():
        path.write_text(text)
        with pytest.raises(UserError) as err:
            load_predictions(path)
        assert where in str(err.value)
        assert err.value.field == field
    path.write_text("\n\n")
    with pytest.raises(UserError, match="no predictions"):
        load_predictions(path)
    with pytest.raises(UserError, match="not found"):
        load_predictions(tmp_path / "missing.jsonl")


def test_score_errors():
    with pytest.raises(UserError, match="row 2: field 'reference'"):
        score("qa", [{"prediction": "x", "reference": "y"}, {"prediction": "x"}])
    with pytest.raises(UserError, match="unknown task 'summarize'"):
        score("summarize", [{"prediction": "x", "reference": "y"}])
    with pytest.raises(UserError, match="empty"):
        score("qa", [])


def test_rouge_leaves_the_root_logger_alone():
    """Scoring must not configure logging: absl's basicConfig made bm25s' debug records print."""
    import subprocess
    import sys

    code = ("import logging; from specialize.evaluate.metrics import rouge_l; "
            "assert rouge_l('a b c', ['a b d']) > 0; print(len(logging.getLogger().handlers))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0", out.stderr
