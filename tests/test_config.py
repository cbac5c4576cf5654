"""Config precedence (defaults < YAML < flags), clear errors, and every shipped recipe loads."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from specialize import config as config_module
from specialize.cli import app
from specialize.config import FinetuneConfig, load_config
from specialize.errors import UserError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
VERB_CONFIG = {"finetune": "FinetuneConfig", "pretrain": "PretrainConfig", "eval": "EvalConfig",
               "compare": "CompareConfig", "convert": "ConvertConfig", "lint": "LintConfig",
               "serve": "ServeConfig", "export": "ExportConfig", "demo": "DemoConfig", "generate": "GenerateConfig",
               "chat": "ChatConfig"}


def test_precedence_defaults_yaml_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 0.01\nepochs: 7\nmicro-batch-size: 3\n", encoding="utf-8")
    cfg = load_config(FinetuneConfig, path, learning_rate=0.5, epochs=None)
    assert cfg.learning_rate == 0.5  # flag beats YAML
    assert cfg.epochs == 7  # YAML beats default; an unset flag (None) changes nothing
    assert cfg.micro_batch_size == 3  # YAML keys may be spelled like flags
    assert cfg.max_seq_tokens == FinetuneConfig().max_seq_tokens  # default


def test_unknown_key_names_key_and_allowed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learnig_rate: 0.01\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"c.yaml: unknown key 'learnig_rate' \(allowed: .*learning_rate"):
        load_config(FinetuneConfig, path)


def test_invalid_value_names_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: ful\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"invalid value for 'method': .*'full', 'lora' or 'qlora'.*got 'ful'"):
        load_config(FinetuneConfig, path)
    with pytest.raises(UserError, match=r"invalid value for 'micro_batch_size'"):
        load_config(FinetuneConfig, None, micro_batch_size=0)


def test_cli_flag_overrides_yaml(tmp_path, tiny_llama):
    path = tmp_path / "c.yaml"
    path.write_text(f"base: {tiny_llama}\ndata: [{tmp_path / 'missing.jsonl'}]\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["finetune", "--config", str(path), "--data", str(tmp_path / "other.jsonl")])
    assert isinstance(result.exception, UserError)
    assert "other.jsonl: no such file or folder" in str(result.exception)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_yaml_loads(path):
    text = path.read_text(encoding="utf-8")
    first = text.splitlines()[0]
    assert first.startswith("# "), f"{path.name} must start with the command that runs it"
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    match = re.search(r"specialize (\w+)", first)
    if path.name.startswith("accelerate_"):
        assert "accelerate launch" in first or "torchrun" in first
        return
    assert match and match.group(1) in VERB_CONFIG, first
    assert f"--config configs/{path.name}" in first
    cls = getattr(config_module, VERB_CONFIG[match.group(1)])
    load_config(cls, path)  # raises on any unknown or invalid key


def test_main_freezes_gc_before_exit_also_on_user_errors(tmp_path):
    # cli.main freezes the collector so CPython's exit-time collection skips the objects torch and
    # transformers made (~0.9 s per run); the error path must still print one line and exit 2.
    code = ("import gc, sys\n"
            "from specialize.cli import main\n"
            f"sys.argv = ['specialize', 'finetune', '--config', {str(tmp_path / 'missing.yaml')!r}]\n"
            "try:\n    main()\n"
            "except SystemExit as e:\n    print('exit', e.code, 'frozen', gc.get_freeze_count() > 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "exit 2 frozen True"
    assert proc.stderr.count("\n") == 1 and "missing.yaml" in proc.stderr and "Traceback" not in proc.stderr


def test_yaml_conveniences_and_errors(tmp_path):
    one = tmp_path / "one.yaml"
    one.write_text("data: train.jsonl\neval_data: val.jsonl\n", encoding="utf-8")
    cfg = load_config(FinetuneConfig, one)
    assert cfg.data == ["train.jsonl"] and cfg.eval_data == ["val.jsonl"]  # a single file is a list of one
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [a.jsonl\nepochs: 2\nmethod: lora\n", encoding="utf-8")
    with pytest.raises(UserError) as err:
        load_config(FinetuneConfig, broken)
    assert str(err.value).startswith(f"{broken}:") and err.value.line is not None
    from specialize.config import DemoConfig

    with pytest.raises(UserError, match="invalid value for 'size'"):
        load_config(DemoConfig, None, size="huge")  # before any data is built
