"""specialize curve: nested subsets, the exact per-point commands, gathering, the summary and the report."""

from __future__ import annotations

import itertools
import json
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from helpers import QA8
from typer.testing import CliRunner

from specialize.config import CurveConfig
from specialize.curve import finetune_command, nested_subsets, run_curve
from specialize.curve_report import summarize
from specialize.errors import UserError


def test_subsets_are_nested_within_a_seed_and_differ_across_seeds():
    fractions = [0.1, 0.25, 0.5, 1.0]
    for seed in (0, 1):
        subsets = nested_subsets(64, fractions, seed)
        assert [len(subsets[f]) for f in fractions] == [6, 16, 32, 64]  # round(f x n)
        for small, large in itertools.pairwise(fractions):
            assert set(subsets[small]) < set(subsets[large])
    assert nested_subsets(64, fractions, 0)[0.25] != nested_subsets(64, fractions, 1)[0.25]
    assert nested_subsets(64, fractions, 0) == nested_subsets(64, fractions, 0)  # the same on every run
    assert len(nested_subsets(3, [0.1], 0)[0.1]) == 1  # at least one row


def test_summary_in_words():
    """Gain per doubling = least-squares slope against log2(examples); rising when the last doubling
    gained more than the seeds disagree; the next doubling: the last doubling's gain again."""
    def point(n, seed, f1):
        return {"examples": n, "seed": seed, "scores": {"seen": {"f1": f1, "exact_match": 0.0}}}

    points = [point(100, 0, 0.20), point(100, 1, 0.22), point(200, 0, 0.30), point(200, 1, 0.32),
              point(400, 0, 0.40), point(400, 1, 0.42)]
    s = summarize({"splits": ["seen"], "points": points, "base": {}})
    seen = s["splits"]["seen"]
    assert seen["gain_per_doubling"] == pytest.approx(0.10)
    assert seen["still_rising"] and seen["next_doubling_examples"] == 800
    assert seen["next_doubling_gain"] == pytest.approx(0.10) and seen["next_doubling_value"] == pytest.approx(0.51)
    assert s["lines"][0].startswith("seen: F1 0.21 at 100 examples -> 0.41 at 400, +0.100 per doubling of the data; "
                                    "still rising")
    flat = points[:4] + [point(400, 0, 0.29), point(400, 1, 0.35)]  # +0.01 on average, seeds 0.06 apart
    s = summarize({"splits": ["seen"], "points": flat, "base": {}})
    assert not s["splits"]["seen"]["still_rising"] and "flat at the end" in s["lines"][0]


def test_point_command_carries_every_finetune_flag_given(tmp_path):
    cfg = CurveConfig(base="some/hub-model", data=["train.jsonl"], method="lora", lora_rank=4, packing=False,
                      max_grad_norm=None, retention=[str(QA8)], seed=7, fractions="0.5,1", out=tmp_path)
    settings = {"base": "some/hub-model", "eval_fraction": 0.0, "method": "lora", "lora_rank": 4,
                "packing": False, "max_grad_norm": None, "retention": [str(QA8.resolve())],
                "data": [str(tmp_path / "d.jsonl")], "out": str(tmp_path / "r"), "seed": 8, "progress": False}
    from specialize.curve import point_settings

    assert point_settings(cfg, tmp_path / "d.jsonl", tmp_path / "r", 1) == settings
    command = finetune_command(settings)
    assert command[1:4] == ["-m", "specialize", "finetune"]
    assert command[4:] == ["--base", "some/hub-model", "--eval-fraction", "0.0", "--method", "lora", "--lora-rank",
                           "4", "--no-packing", "--max-grad-norm", "none", "--retention", str(QA8.resolve()),
                           "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "r"), "--seed", "8",
                           "--no-progress"]


class _Svg(HTMLParser):
    def __init__(self):
        super().__init__()
        self.means, self.bands, self.svgs = [], [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.svgs += tag == "svg"
        if tag == "polyline" and attrs.get("class") == "mean":
            self.means.append((attrs["data-series"], attrs["points"]))
        if tag == "polygon" and attrs.get("class") == "spread":
            self.bands.append(attrs["data-series"])


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("general") / "general.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    return path


def _cfg(base, out, text_file, **kw) -> CurveConfig:
    values = {"base": str(base), "data": [str(QA8)], "eval_data": [str(QA8)], "fractions": "0.5,1.0", "seeds": 1,
              "out": out, "method": "full", "max_steps": 2, "learning_rate": 5e-3, "micro_batch_size": 4,
              "retention": [str(text_file)], "max_new_tokens": 8}
    return CurveConfig(**(values | kw))


def test_plan_then_gather_points_run_elsewhere(tiny_llama, tmp_path, text_file, monkeypatch):
    """--plan writes each point's data and exact command; run as a scheduler would (here: the CLI in
    process), curve then only gathers: nothing is trained again, and the subsets are nested on disk."""
    from specialize.cli import app

    plan = run_curve(_cfg(tiny_llama, tmp_path / "c", text_file, plan=True))
    assert [p["status"] for p in plan["points"]] == ["planned", "planned"]
    assert not (tmp_path / "c" / "report.html").exists()
    small, full = (Path(p["run"]).parent / "data.jsonl" for p in plan["points"])
    small_rows, full_rows = (f.read_text().splitlines() for f in (small, full))
    assert len(small_rows) == 4 and set(small_rows) < set(full_rows) and len(full_rows) == 8
    for p in plan["points"]:
        result = CliRunner().invoke(app, p["command"][3:])
        assert result.exit_code == 0, result.output

    def no_training(*args, **kwargs):
        raise AssertionError("a finished point was trained again")

    monkeypatch.setattr(subprocess, "Popen", no_training)
    curve = run_curve(_cfg(tiny_llama, tmp_path / "c", text_file))
    assert [p["examples"] for p in curve["points"]] == [4, 8]
    for p in curve["points"]:
        summary = json.loads((Path(p["run"]) / "train_summary.json").read_text())
        after = summary["retention"]["general.txt"]
        assert p["retention"] == {"general.txt": {"perplexity": after["after"], "change": after["change"]}}
        assert set(p["scores"]["qa8"]) == {"f1", "exact_match"}
    assert curve["base"]["retention"]["general.txt"]["perplexity"] == pytest.approx(after["before"])
    saved = json.loads((tmp_path / "c" / "curve.json").read_text())
    assert saved["points"] == curve["points"] and saved["summary"]["splits"]["qa8"]["examples"] == [4, 8]
    svg = _Svg()
    svg.feed((tmp_path / "c" / "report.html").read_text())
    assert [name for name, _ in svg.means] == ["full"] and svg.bands == ["full"]
    assert len(svg.means[0][1].split()) == 2  # one mean per size
    assert svg.svgs >= 2  # quality vs examples, retention vs quality

    # A changed setting is a different point: its run no longer counts as done.
    with pytest.raises(AssertionError, match="trained again"):
        run_curve(_cfg(tiny_llama, tmp_path / "c", text_file, learning_rate=1e-3))


@pytest.mark.slow  # ~25 s on a busy machine: two fresh interpreters importing torch
def test_points_run_as_processes(tiny_llama, tmp_path, text_file):
    """Points run as `python -m specialize finetune` processes; the log and time are kept per point."""
    cfg = _cfg(tiny_llama, tmp_path / "c", text_file, jobs=2).model_copy(update={"fractions": [1.0]})
    curve = run_curve(cfg)
    (point,) = curve["points"]
    assert point["seconds"] > 0 and "scores" in point
    assert "done:" in (Path(point["run"]).parent / "log.txt").read_text()


def test_two_splits_with_one_stem_are_refused(tmp_path, text_file):
    """Scores are keyed by file stem: a second qa8.jsonl would overwrite the first one's scores."""
    (tmp_path / "b").mkdir()
    other = tmp_path / "b" / QA8.name
    other.write_text(QA8.read_text())
    with pytest.raises(UserError, match="two test files are both named 'qa8'; splits are named by file stem"):
        run_curve(_cfg(tmp_path / "base", tmp_path / "c", text_file, eval_data=[str(QA8), str(other)]))


def test_nothing_stale_looks_complete(tmp_path, text_file, monkeypatch):
    """A plan removes an earlier report.html; a failed point leaves curve.json saying "failed", no report."""
    import specialize.curve as curve_module

    out = tmp_path / "c"
    out.mkdir()
    (out / "report.html").write_text("<html>an earlier curve</html>")
    (out / "curve.json").write_text(json.dumps({"points": [{"name": "old", "scores": {}}]}))
    run_curve(_cfg(tmp_path / "base", out, text_file, plan=True))
    assert not (out / "report.html").exists()

    def fail(points, jobs, on_done):
        raise UserError("point f1.0-s0 failed (exit 1): out of memory")

    (out / "report.html").write_text("<html>an earlier curve</html>")
    monkeypatch.setattr(curve_module, "run_points", fail)
    with pytest.raises(UserError, match="out of memory"):
        run_curve(_cfg(tmp_path / "base", out, text_file))
    saved = json.loads((out / "curve.json").read_text())
    assert saved["status"] == "failed" and saved["error"] == "point f1.0-s0 failed (exit 1): out of memory"
    assert saved["points"] == [] and not (out / "report.html").exists()
