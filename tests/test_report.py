"""The recommendation from hand-made scorecards, and the self-contained report.html."""

import re

import pytest

from specialize.evaluate import main_metric, recommend, score
from specialize.evaluate.report import write_report


def system(name, splits, tokens, latency, training=None, **extra):
    """A scorecard system; splits: {split: (f1, hallucination_rate)}."""
    return {"name": name, "prompt_tokens_per_example": tokens, "latency_s_per_example": latency,
            "training": training, **extra,
            "splits": {s: {"exact_match": f1 - 0.1, "f1": f1, "hallucination_rate": h, "n": 100}
                       for s, (f1, h) in splits.items()}}


FT = {"seconds": 300.0, "tokens": 1_200_000}


def test_clear_quality_winner():
    rec = recommend([system("base", {"test": (0.40, 0.3)}, 40, 0.1),
                     system("base+rag", {"test": (0.60, 0.1)}, 800, 0.4),
                     system("fine-tuned", {"test": (0.80, 0.1)}, 40, 0.1, FT)])
    assert rec["system"] == "fine-tuned" and rec["metric"] == "f1"
    assert rec["reasons"][0] == "fine-tuned has the best f1 averaged over test: 0.800 (base 0.400; base+rag 0.600)."
    assert "fine-tuned needed fine-tuning up front: 300 s on 1,200,000 tokens." in rec["reasons"]


def test_quality_tie_prefers_shorter_prompt():
    # 0.80 vs 0.82 is within the 0.02 margin (checks the float epsilon too)
    rec = recommend([system("base+rag", {"test": (0.82, 0.05)}, 800, 0.40),
                     system("fine-tuned", {"test": (0.80, 0.05)}, 40, 0.10, FT)])
    assert rec["system"] == "fine-tuned"
    assert rec["reasons"][:2] == [
        "base+rag has the best f1 averaged over test: 0.820 (fine-tuned 0.800).",
        "fine-tuned is within 0.02 of it (0.800), so the cheaper or more faithful system is preferred."]
    assert "fine-tuned costs 40 prompt tokens and 0.100 s per example (base+rag 800 tokens, 0.400 s)." \
        in rec["reasons"]


def test_an_unknown_cost_never_wins_a_cost_tie_break():
    # an outside system scored from a predictions file has no prompt-token or latency figures
    outside = system("gpt4o", {"test": (0.81, 0.05)}, None, None)
    rec = recommend([system("base", {"test": (0.50, 0.2)}, 40, 0.1),
                     system("finetuned", {"test": (0.80, 0.05)}, 60, 0.1, FT),
                     system("base+rag", {"test": (0.80, 0.05)}, 800, 0.4), outside])
    assert rec["system"] == "finetuned"
    assert rec["reasons"][1] == ("finetuned is within 0.02 of it (0.800), gpt4o's cost per example is unknown, "
                                 "so the measured one is preferred.")
    rec = recommend([system("base", {"test": (0.50, 0.2)}, 40, 0.1), outside])
    assert rec["system"] == "gpt4o"  # clearly better: quality decides before cost
    rec = recommend([system("base", {"test": (0.80, 0.05)}, 40, 0.1), outside])
    assert rec["system"] == "base"


def test_equal_cost_tie_prefers_no_training():
    rec = recommend([system("fine-tuned", {"test": (0.71, 0.1)}, 42, 0.105, FT),
                     system("base", {"test": (0.70, 0.1)}, 40, 0.100)])
    assert rec["system"] == "base"
    assert "base needs no training." in rec["reasons"]


def test_hallucination_breaks_quality_tie():
    rec = recommend([system("fine-tuned", {"test": (0.81, 0.30)}, 40, 0.1, FT),
                     system("base+rag", {"test": (0.80, 0.05)}, 800, 0.4)])
    assert rec["system"] == "base+rag"
    assert "base+rag hallucination rate: 0.050 (fine-tuned 0.300)." in rec["reasons"]


def test_average_over_splits_and_split_caveat():
    # fine-tuned: (0.9 + 0.3) / 2 = 0.6; base+rag: (0.5 + 0.6) / 2 = 0.55
    rec = recommend([system("base+rag", {"seen": (0.5, 0.1), "unseen": (0.6, 0.1)}, 800, 0.4),
                     system("fine-tuned", {"seen": (0.9, 0.1), "unseen": (0.3, 0.1)}, 40, 0.1, FT)])
    assert rec["system"] == "fine-tuned"
    assert rec["reasons"][0] == "fine-tuned has the best f1 averaged over seen, unseen: 0.600 (base+rag 0.550)."
    assert rec["reasons"][-1] == "On split unseen, base+rag is better: f1 0.600 vs 0.300."


def test_main_metric_by_task():
    def with_metrics(**m):
        return [{"name": "s", "splits": {"test": m}}]
    assert main_metric(with_metrics(accuracy=1.0, macro_f1=0.5)) == "macro_f1"
    assert main_metric(with_metrics(exact_match=1.0, field_f1=0.5, json_valid=1.0)) == "field_f1"
    assert main_metric(with_metrics(rouge_l=0.4)) == "rouge_l"
    with pytest.raises(ValueError):
        main_metric(with_metrics(n=3))


def test_report_is_self_contained_and_escaped(tmp_path):
    rows = [{"prediction": "<script>alert('x')</script> Paris", "reference": "Paris",
             "question": "Capital of <France> & co?", "stopped": True},
            {"prediction": "Lyon", "reference": "Lyon", "stopped": True}]
    rag_metrics, rag_examples = score("qa", rows)
    ft_metrics, ft_examples = score("qa", [{"prediction": "Paris", "reference": "Paris", "stopped": True},
                                           {"prediction": "Nice Nice Nice Nice Nice Nice",
                                            "reference": "Lyon", "stopped": False}])
    cls_metrics, _ = score("classify", [{"prediction": "a", "reference": "b"}])
    systems = [
        {"name": "base+rag", "prompt_tokens_per_example": 812.0, "latency_s_per_example": 0.4,
         "training": None, "splits": {"test": rag_metrics}},
        {"name": "fine-tuned", "prompt_tokens_per_example": 41.0, "latency_s_per_example": 0.1,
         "training": FT, "splits": {"test": ft_metrics}}]
    scorecard = {"task": "qa", "systems": systems, "recommendation": recommend(systems)}
    loss = [{"step": s, "loss": 3.0 / s, "eval_loss": 3.5 / s if s % 5 == 0 else None}
            for s in range(1, 31)]
    examples = {"base+rag": {"test": rag_examples}, "fine-tuned": {"test": ft_examples}}
    out = write_report(scorecard, tmp_path / "sub" / "report.html", loss, examples)
    html = out.read_text(encoding="utf-8")

    assert "base+rag" in html and "fine-tuned" in html
    assert "Recommendation: " + scorecard["recommendation"]["system"] in html
    assert "<script" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; Paris" in html
    assert "Capital of &lt;France&gt; &amp; co?" in html
    assert html.count("<svg") == 4  # metric bars, 2 quality-vs-cost scatters, loss curve
    assert "<polyline" in html and "<circle" in html
    assert "http://" not in html and "https://" not in html
    assert not re.search(r"""(src|href)\s*=|@import|url\(""", html)
    assert "test: repetitive (1 examples)" in html and "test: never_stopped (1 examples)" in html

    # a classification scorecard shows its confusion matrix
    cls = {"systems": [{"name": "clf", "training": None, "splits": {"test": cls_metrics}}]}
    html = write_report(cls, tmp_path / "cls.html").read_text(encoding="utf-8")
    assert "Confusion matrix: clf" in html


def test_retention_any_nesting_becomes_before_after_pairs():
    from specialize.evaluate.report import retention_changes, retention_text

    assert retention_changes({"before": {"perplexity": 9.1}, "after": {"perplexity": 9.8}}) == \
        [("perplexity", 9.1, 9.8)]
    per_file = {"wiki.txt": {"before": {"perplexity": 12.0}, "after": {"perplexity": 15.5}},
                "trivia.jsonl": {"before": {"f1": 0.5, "n": 20}, "after": {"f1": 0.25, "n": 20}}}
    assert retention_changes(per_file) == [("wiki.txt perplexity", 12.0, 15.5), ("trivia.jsonl f1", 0.5, 0.25),
                                           ("trivia.jsonl n", 20.0, 20.0)]
    assert retention_text({"before": {"wiki.txt": {"perplexity": 12.0}}, "after": {"wiki.txt": {}}}) == \
        "wiki.txt perplexity 12.0 -> ?"
    # what finetune writes: one entry per retention set, with its kind and the numbers that follow from the pair
    written = {"held-out documents": {"kind": "perplexity", "before": 64.7, "after": 71.2, "change": 6.5,
                                      "relative_change": 0.1, "source": "/runs/base", "blocks": 44},
               "general_qa.jsonl": {"kind": "f1", "before": 0.31, "after": 0.22, "change": -0.09,
                                    "exact_match_before": 0.1, "exact_match_after": 0.05, "examples": 50}}
    assert retention_changes(written) == [("held-out documents perplexity", 64.7, 71.2),
                                          ("general_qa.jsonl f1", 0.31, 0.22)]
    assert retention_text(written) == \
        "held-out documents perplexity 64.7 -> 71.2 (+10%); general_qa.jsonl f1 0.310 -> 0.220 (-29%)"
    assert retention_text(None) == retention_text({}) == ""


def test_task_metrics_agent_costs_and_retention_are_shown(tmp_path):
    """Whatever a task reports (tool_call's metrics here) gets a column, as do tool calls and retention."""
    from rich.console import Console

    from specialize.evaluate.report import scorecard_table

    def tool_split(accuracy, tokens=None, calls=None):
        metrics = {"call_accuracy": accuracy, "argument_f1": accuracy / 2, "stop_rate": 1.0, "n": 4}
        return metrics | ({"prompt_tokens_per_example": tokens} if tokens else {}) \
            | ({"tool_calls_per_example": calls} if calls is not None else {})

    scorecard = {"task": "tool_call", "systems": [
        {"name": "finetuned", "prompt_tokens_per_example": 120.0, "latency_s_per_example": 0.1, "training": FT,
         "retention": {"before": {"perplexity": 9.1}, "after": {"perplexity": 9.8}},
         "splits": {"seen": tool_split(0.75, 100.0), "unseen": tool_split(0.5, 140.0)}},
        {"name": "finetuned+agent", "prompt_tokens_per_example": 200.0, "latency_s_per_example": 0.2,
         "tool_calls_per_example": 0.5, "training": FT, "retention": None,
         "splits": {"seen": tool_split(1.0, 150.0, 0.0), "unseen": tool_split(0.75, 250.0, 1.0)}}],
        "recommendation": None}
    console = Console(width=250, record=True)
    console.print(scorecard_table(scorecard))
    text = console.export_text()
    header = next(line for line in text.splitlines() if "system" in line)
    assert re.findall(r"[\w/.+]+", header) == ["system", "split", "stop_rate", "argument_f1", "call_accuracy",
                                               "tool_calls_per_example", "prompt", "tok/ex", "latency", "s/ex",
                                               "train", "s", "retention"]
    cells = {tuple(c[:2]): c for line in text.splitlines() if "finetuned" in line
             for c in [[cell.strip() for cell in line.strip("│ ").split("│")]]}
    assert cells["finetuned+agent", "unseen"][2:] == \
        ["1.000", "0.375", "0.750", "1.000", "250", "0.200", "300", "-"]
    assert cells["finetuned", "seen"][2:] == ["1.000", "0.375", "0.750", "-", "100", "0.100", "300",
                                              "perplexity 9.100 -> 9.800 (+8%)"]  # no tool calls: blank, not 0
    html = write_report(scorecard, tmp_path / "report.html").read_text()
    assert "<th>tool calls / example</th>" in html and "<th>retention (before -&gt; after)</th>" in html
    assert "perplexity 9.100 -&gt; 9.800 (+8%)" in html
    assert "<th>call_accuracy</th>" in html and "<th>tool_calls_per_example</th>" in html


def test_reward_kl_and_lengths_of_a_grpo_run_are_plotted(tmp_path):
    """GRPO (and DPO) rows of metrics.jsonl share the step with the loss rows; each scale gets its chart."""
    rows = []
    for s in range(1, 11):
        rows.append({"step": s, "loss": 1.0 / s})
        rows.append({"step": s, "reward": 0.1 * s, "rewards/f1/mean": 0.1 * s, "kl": 0.01 * s,
                     "completions/mean_length": 20.0 - s, "completions/clipped_ratio": 0.5 / s})
    scorecard = {"systems": [system("sft+grpo", {"test": (0.5, 0.1)}, 40.0, 0.1, FT)]}
    html = write_report(scorecard, tmp_path / "r.html", rows).read_text(encoding="utf-8")
    section = html[html.index("<h2>Training signals</h2>"):]
    charts = dict(re.findall(r"<h3>([^<]+)</h3>\s*(<svg.*?</svg>)", section, flags=re.S))
    assert list(charts) == ["Rewards", "KL to the reference", "Completion length", "Shares"]
    assert ">reward<" in charts["Rewards"] and ">rewards/f1/mean<" in charts["Rewards"]
    assert ">kl<" in charts["KL to the reference"] and ">completions/clipped_ratio<" in charts["Shares"]
    assert all(chart.count("<polyline") == chart.count("<rect") for chart in charts.values())
    # an SFT run logs none of them: no such section
    plain = write_report(scorecard, tmp_path / "p.html", rows[::2]).read_text(encoding="utf-8")
    assert "Training signals" not in plain
