"""lm-evaluation-harness on a run: model args, results, and a local offline task (slow, needs lm-eval)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from specialize.errors import UserError
from specialize.evaluate.harness import OFFLINE_ENV, lm_eval_command, lm_eval_model_args, read_results

HARNESS = Path(__file__).parent / "assets" / "harness"


def _fake_run(root: Path, adapter: bool) -> Path:
    (root / "model").mkdir(parents=True)
    (root / "config.yaml").write_text("base: /models/base\n")
    if adapter:
        (root / "model" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/models/base"}))
    else:
        (root / "model" / "config.json").write_text("{}")
    return root


def test_model_args_for_full_and_lora_runs(tmp_path):
    full = _fake_run(tmp_path / "full", adapter=False)
    assert lm_eval_model_args(full) == f"pretrained={full / 'model'}"
    lora = _fake_run(tmp_path / "lora", adapter=True)
    # the tokenizer comes from the run, which carries the chat template the base lacks
    assert lm_eval_model_args(lora) == f"pretrained=/models/base,peft={lora / 'model'},tokenizer={lora / 'model'}"
    chained = _fake_run(tmp_path / "chained", adapter=True)  # a LoRA trained on the LoRA run
    (chained / "model" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(lora / "model")}))
    with pytest.raises(UserError, match="lm-eval cannot stack adapters: run `specialize export"):
        lm_eval_model_args(chained)
    argv = lm_eval_command(full, ["specialize_qa8", "arc_easy"], include_path=HARNESS, limit=4)
    assert argv[1:] == ["-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={full / 'model'}",
                        "--tasks", "specialize_qa8,arc_easy", "--batch_size", "8", "--include_path", str(HARNESS),
                        "--apply_chat_template", "--limit", "4"]


def test_read_results_drops_the_default_filter(tmp_path):
    folder = tmp_path / "out" / "model_name"
    folder.mkdir(parents=True)
    (folder / "results_2026-01-01T00-00-00.json").write_text(json.dumps({"results": {"specialize_qa8": {
        "alias": "specialize_qa8", "exact_match,none": 0.75, "exact_match_stderr,none": 0.1,
        "exact_match,strict": 0.5}}}))
    assert read_results(tmp_path / "out") == {"specialize_qa8": {
        "exact_match": 0.75, "exact_match_stderr": 0.1, "exact_match,strict": 0.5}}


def test_local_task_reads_a_local_file_with_a_builtin_metric():
    task = yaml.safe_load((HARNESS / "specialize_qa8.yaml").read_text())
    assert task["dataset_path"] == "json"
    assert (HARNESS / task["dataset_kwargs"]["data_files"]["test"]).is_file()
    assert [m["metric"] for m in task["metric_list"]] == ["exact_match"]  # lm_eval's own: no download


@pytest.mark.slow
def test_lm_eval_scores_the_run_on_a_local_task_offline(qa8_run, tmp_path):
    pytest.importorskip("lm_eval", reason="pip install lm-eval")
    run = qa8_run
    argv = lm_eval_command(run, ["specialize_qa8"], include_path=".", output_path=tmp_path, device="cpu")
    # run from the task folder: the task's data_files path is relative to the working directory
    proc = subprocess.run(argv, cwd=HARNESS, env={**os.environ, **OFFLINE_ENV}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # --apply_chat_template rendered the run's own template, so the run answers as in training
    assert read_results(tmp_path)["specialize_qa8"]["exact_match"] == 1.0
