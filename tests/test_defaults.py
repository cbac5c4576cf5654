"""Defaults that fit the model: unset max_seq_tokens, method and learning rate are chosen from
the model and the data, said out loud, and recorded in config.yaml; a base with a short context
runs every command with default flags."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config
from typer.testing import CliRunner

from helpers import QA8, write_jsonl
from specialize import defaults
from specialize.cli import app

POSITIONS = 128


@pytest.fixture(scope="module")
def short_base(tmp_path_factory, tokenizer_dir) -> Path:
    """A GPT-2 that holds 128 positions (learned positions: one more is an IndexError, not a warning)."""
    path = tmp_path_factory.mktemp("short-gpt2")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=POSITIONS,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _qa8_plus_long(tmp_path: Path) -> Path:
    rows = [json.loads(line) for line in QA8.read_text(encoding="utf-8").splitlines()]
    rows.append({"question": "Describe everything " + "in great detail " * 80, "answer": "No."})
    return write_jsonl(tmp_path / "data.jsonl", rows)


def test_choices_and_their_reasons():
    assert str(defaults.max_seq_tokens(256, 300, False)) == "max_seq_tokens 256 (the model's context)"
    assert str(defaults.max_seq_tokens(2048, 183, False)) == "max_seq_tokens 183 (covers the longest example)"
    assert defaults.max_seq_tokens(None, 183, False).value == 183
    assert defaults.max_seq_tokens(8192, 40, True).value == defaults.TEXT_WINDOW
    assert defaults.max_seq_tokens(512, 40, True).value == 512
    assert defaults.method(134_515_008).value == "lora" and "135M parameters" in defaults.method(134_515_008).reason
    assert defaults.method(1_300_000).value == "full"
    assert defaults.learning_rate("lora", 134_515_008).value == 2e-4
    assert defaults.learning_rate("qlora", 7_000_000_000).value == 2e-4
    assert defaults.learning_rate("full", 134_515_008).value == 2e-5
    assert defaults.learning_rate("full", 1_300_000).value == 2e-4


def test_a_short_context_base_runs_every_command_with_default_flags(tmp_path, short_base, capsys):
    data = _qa8_plus_long(tmp_path)
    runner = CliRunner()
    lint = runner.invoke(app, ["lint", "--data", str(data), "--base", str(short_base)])
    assert lint.exit_code in (0, 1), lint.output
    assert f"max {POSITIONS} tokens" in lint.output and "longer than --max-seq-tokens 128" in lint.output

    out = tmp_path / "run"
    result = runner.invoke(app, ["finetune", "--base", str(short_base), "--data", str(data), "--out", str(out),
                                 "--max-steps", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    said = " ".join((result.output + capsys.readouterr().err).split())
    assert "max_seq_tokens 128 (the model's context)" in said
    assert "method full (" in said and "learning_rate 0.0002 (for full fine-tuning of a small model" in said
    assert "dropped 1 example(s)" in said  # the long one: reported, never cut
    saved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    assert (saved["max_seq_tokens"], saved["method"], saved["learning_rate"]) == (128, "full", 2e-4)

    generated = runner.invoke(app, ["generate", "--model", str(out), "What is the capital of France?"])
    assert generated.exit_code == 0, generated.output
    evaluated = runner.invoke(app, ["eval", "--model", str(out), "--data", str(QA8), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.output.strip().splitlines()[-1])["n"] == 8
    exported = runner.invoke(app, ["export", "--model", str(out), "--out", str(tmp_path / "export")])
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "export" / "config.json").is_file()


def test_unset_max_seq_tokens_covers_the_longest_example(tmp_path, tiny_llama, capsys):
    from specialize.config import FinetuneConfig
    from specialize.finetune import finetune

    run = finetune(FinetuneConfig(base=str(tiny_llama), data=[str(QA8)], out=tmp_path / "run", max_steps=1,
                                  progress=False))
    said = " ".join(capsys.readouterr().err.split())
    chosen = run.read_config()["max_seq_tokens"]
    assert f"max_seq_tokens {chosen} (covers the longest example)" in said
    assert 10 < chosen < 512  # QA8's longest conversation, well inside the model's 512 positions


def test_auto_method_is_lora_from_the_threshold(tmp_path, tiny_llama, monkeypatch, capsys):
    from specialize.config import FinetuneConfig
    from specialize.finetune import finetune

    monkeypatch.setattr(defaults, "LORA_FROM_PARAMETERS", 1000)  # the tiny model counts as large here
    run = finetune(FinetuneConfig(base=str(tiny_llama), data=[str(QA8)], out=tmp_path / "run", max_steps=1,
                                  progress=False))
    said = " ".join(capsys.readouterr().err.split())
    assert "method lora (" in said and "learning_rate 0.0002 (for lora)" in said
    assert (Path(run) / "model" / "adapter_config.json").is_file()
    assert run.read_summary()["method"] == "lora"


def test_a_limit_beyond_the_context_is_one_clear_error(tmp_path, short_base):
    result = CliRunner().invoke(app, ["finetune", "--base", str(short_base), "--data", str(QA8), "--out",
                                      str(tmp_path / "run"), "--max-seq-tokens", "512"])
    assert result.exit_code != 0
    assert "longer than the 128 positions" in str(result.exception) and not (tmp_path / "run" / "model").exists()
    assert not os.path.exists(tmp_path / "run" / "config.yaml")


def test_the_parameter_count_comes_from_the_config_before_any_weight_loads(tiny_llama, short_base):
    from specialize.model import count_parameters, load_model

    for ref in (tiny_llama, short_base):
        assert defaults.model_parameters(str(ref)) == count_parameters(load_model(str(ref)))[1]
    assert defaults.model_parameters("/no/such/model") is None
