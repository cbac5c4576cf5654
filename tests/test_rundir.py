"""The run folder: what a run may write into, the lock against a second process, and reading runs.

Each guard exists because `--out` is typed by hand: a fresh run removes the previous run's
outputs, which must never be a user's own files or this run's own input.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import QA8, write_jsonl
from specialize.cli import app
from specialize.config import FinetuneConfig, save_config
from specialize.errors import UserError
from specialize.finetune import finetune
from specialize.rundir import MARKER, RunDir


def _cfg(base, out, **kw) -> FinetuneConfig:
    return FinetuneConfig(base=str(base), data=[str(QA8)], out=out, max_steps=2, micro_batch_size=4,
                          eval_fraction=0, progress=False, **kw)


def test_a_folder_of_other_files_is_refused_and_left_alone(tmp_path, tiny_llama):
    out = tmp_path / "mine"
    (out / "model").mkdir(parents=True)
    (out / "model" / "notes.txt").write_text("my notes", encoding="utf-8")
    (out / "metrics.jsonl").write_text('{"mine": 1}\n', encoding="utf-8")
    result = CliRunner().invoke(app, ["finetune", "--base", str(tiny_llama), "--data", str(QA8), "--out", str(out),
                                      "--max-steps", "1", "--no-progress"])
    assert isinstance(result.exception, UserError)
    assert "holds files specialize did not write (metrics.jsonl, model)" in str(result.exception)
    assert (out / "model" / "notes.txt").read_text(encoding="utf-8") == "my notes"
    assert (out / "metrics.jsonl").read_text(encoding="utf-8") == '{"mine": 1}\n'
    assert sorted(p.name for p in out.iterdir()) == [".lock", "metrics.jsonl", "model"] or \
        sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "model"]


def test_an_input_inside_the_run_is_never_deleted(tmp_path, tiny_llama):
    out = tmp_path / "run"
    finetune(_cfg(tiny_llama, out))
    data = write_jsonl(out / "model" / "data.jsonl", [json.loads(line) for line in QA8.read_text().splitlines()])
    with pytest.raises(UserError, match="inside this run's model"):
        finetune(_cfg(tiny_llama, out).model_copy(update={"data": [str(data)]}))
    assert data.is_file()
    # fine-tuning a run into its own folder would delete the base it loads
    with pytest.raises(UserError, match="inside this run's model"):
        finetune(_cfg(out, out))
    assert (out / "model" / "config.json").is_file()


def test_a_run_folder_is_reused_and_marked(tmp_path, tiny_llama):
    out = tmp_path / "run"
    first = finetune(_cfg(tiny_llama, out))
    assert isinstance(first, RunDir) and first == out and Path(first) == out
    assert json.loads((out / MARKER).read_text())["kind"] == "finetune"
    assert RunDir.find(out).read_summary()["steps"] == 2
    assert [row["step"] for row in RunDir(out).read_metrics() if "loss" in row] == [1, 2]
    second = finetune(_cfg(tiny_llama, out, seed=7))
    assert second.read_config()["seed"] == 7


def test_bad_input_leaves_the_previous_run_intact(tmp_path, tiny_llama):
    out = tmp_path / "run"
    finetune(_cfg(tiny_llama, out))
    before = (out / "model" / "model.safetensors").read_bytes()
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q"}])
    with pytest.raises(UserError):
        finetune(_cfg(tiny_llama, out).model_copy(update={"data": [str(bad)]}))
    assert (out / "model" / "model.safetensors").read_bytes() == before
    assert RunDir(out).read_summary() is not None


def test_runs_from_before_the_marker_are_recognised(tmp_path, tiny_llama):
    out = tmp_path / "old"
    (out / "checkpoints").mkdir(parents=True)
    save_config(FinetuneConfig(base="b", out=out), out / "config.yaml")
    assert RunDir.is_run(out)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.yaml").write_text("model: gpt2\n", encoding="utf-8")
    (tmp_path / "other" / "checkpoints").mkdir()
    assert not RunDir.is_run(tmp_path / "other")  # a config of something else


def test_resume_into_a_folder_without_a_run_is_refused(tmp_path, tiny_llama):
    with pytest.raises(UserError, match="holds no run to continue"):
        finetune(_cfg(tiny_llama, tmp_path / "empty", resume=True).model_copy(update={"out": tmp_path}))


_HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from specialize.config import FinetuneConfig
    from specialize.rundir import RunDir
    RunDir.start(FinetuneConfig(out=sys.argv[1]))
    print("locked", flush=True)
    time.sleep(60)
""")


def test_a_second_process_is_refused_at_once_and_a_killed_one_leaves_no_stale_lock(tmp_path, tiny_llama):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True,
                              env=os.environ | {"PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match="another specialize process is writing this run"):
            finetune(_cfg(tiny_llama, out))
        assert not (out / "model").exists() and not (out / "config.yaml").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    run = finetune(_cfg(tiny_llama, out))  # the OS released the dead process's lock
    assert (Path(run) / "model" / "config.json").is_file()


def test_a_run_that_failed_before_writing_anything_final_can_be_retried(tmp_path, tiny_llama):
    """A run stopped early (Ctrl-C while tokenising, bad data) left files of its own: still its folder."""
    out = tmp_path / "run"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q"}])
    with pytest.raises(UserError):
        finetune(_cfg(tiny_llama, out).model_copy(update={"data": [str(bad)]}))
    (out / "tokenizer").mkdir()  # as pretrain writes before it begins
    run = finetune(_cfg(tiny_llama, out))
    assert (Path(run) / "model" / "config.json").is_file()


def test_resume_with_a_mistyped_out_is_refused(tmp_path, tiny_llama):
    with pytest.raises(UserError, match="holds no run to continue"):
        finetune(_cfg(tiny_llama, tmp_path / "no-such-run", resume=True))
    assert not (tmp_path / "no-such-run").exists()
