"""Every field of every stage config is a documented flag of its command, with its default shown.

The flags are generated from the config models (`specialize.flags`); these tests walk the
models field by field and read each command's rendered `--help`, so a field without a flag,
a flag without help, or a default that `--help` hides fails here.
"""

from __future__ import annotations

import importlib
import re

import pytest
from typer.testing import CliRunner

from specialize.cli import app
from specialize.config import (ChatConfig, CompareConfig, ConvertConfig, DemoConfig, EvalConfig, ExportConfig,
                               FinetuneConfig, GenerateConfig, LintConfig, PretrainConfig, ServeConfig, TrainConfig,
                               load_config)
from specialize.flags import flag_name

COMMANDS = {"demo": DemoConfig, "pretrain": PretrainConfig, "finetune": FinetuneConfig, "generate": GenerateConfig,
            "chat": ChatConfig, "eval": EvalConfig, "compare": CompareConfig, "convert": ConvertConfig,
            "lint": LintConfig, "serve": ServeConfig, "export": ExportConfig}
ARGUMENTS = {("convert", "inputs")}  # fields taken as positional arguments


def _help(command: str) -> str:
    """`specialize COMMAND --help`, wide enough that no cell wraps, with the table drawing removed."""
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400", "NO_COLOR": "1"},
                                terminal_width=400)
    assert result.exit_code == 0, result.output
    return result.output


def _rows(help_text: str) -> dict[str, str]:
    """flag -> its help row (text after the flag, boxes and extra spaces removed)."""
    rows = {}
    for line in help_text.splitlines():
        cells = line.strip("│ ").split()
        if cells and cells[0].startswith("--"):
            for flag in cells[0].split(","):  # "--json-output,--json": a flag and its alias
                rows[flag] = " ".join(line.replace("│", " ").split())
    return rows


def _expected_default(value) -> str | None:
    if value is None or value == [] or value == "":
        return None
    if isinstance(value, bool):
        return None  # on/off flags: shown as the flag's name, checked below
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_config_field_is_a_documented_flag_with_its_default(command):
    cls = COMMANDS[command]
    help_text = _help(command)
    rows = _rows(help_text)
    for field, info in cls.model_fields.items():
        assert info.description, f"{cls.__name__}.{field} has no description"
        words = " ".join(info.description.split())
        if (command, field) in ARGUMENTS:
            assert field.upper() in help_text and words in " ".join(help_text.replace("│", " ").split())
            continue
        flag = flag_name(field)
        assert flag in rows, f"`specialize {command}` has no {flag} (field {cls.__name__}.{field})"
        assert words in rows[flag], f"{flag}: help is not the field's description"
        default = info.get_default(call_default_factory=True)
        if isinstance(default, bool):
            shown = flag if default else "--no-" + flag[2:]
            assert f"[default: {shown[2:]}]" in rows[flag], rows[flag]
        elif (expected := _expected_default(default)) is not None:
            assert f"[default: {expected}]" in rows[flag], f"{flag}: default {expected} not shown: {rows[flag]}"


def test_training_loop_flags_are_the_same_on_pretrain_and_finetune():
    pretrain, finetune = _rows(_help("pretrain")), _rows(_help("finetune"))
    for field in TrainConfig.model_fields:
        assert flag_name(field) in pretrain and flag_name(field) in finetune, field
    # the loop's schedule flags were missing on finetune once
    for flag in ("--lr-schedule", "--warmup-steps", "--eval-fraction", "--weight-decay", "--max-grad-norm"):
        assert flag in finetune


def _config_from(args: list[str], monkeypatch, tmp_path) -> FinetuneConfig:
    """The FinetuneConfig that `specialize finetune ARGS` would run (the stage itself is stubbed)."""
    seen = {}
    monkeypatch.setattr(importlib.import_module("specialize.finetune"), "finetune",
                        lambda cfg: seen.setdefault("cfg", cfg))
    result = CliRunner().invoke(app, ["finetune", *args])
    assert result.exit_code == 0, result.output
    return seen["cfg"]


def test_list_flags_repeat_and_values_reach_the_config(monkeypatch, tmp_path):
    cfg = _config_from(["--data", "a.jsonl", "--data", "b.jsonl", "--lora-target-modules", "q_proj",
                        "--lora-target-modules", "v_proj", "--no-packing", "--max-grad-norm", "none",
                        "--lr-schedule", "linear", "--warmup-steps", "3"], monkeypatch, tmp_path)
    assert cfg.data == ["a.jsonl", "b.jsonl"]
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.packing is False and cfg.max_grad_norm is None
    assert cfg.lr_schedule == "linear" and cfg.warmup_steps == 3


def test_flags_left_out_do_not_override_yaml(monkeypatch, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("packing: false\nmax_grad_norm: 0.5\nepochs: 2\n", encoding="utf-8")
    cfg = _config_from(["--config", str(path), "--epochs", "4"], monkeypatch, tmp_path)
    assert cfg.packing is False and cfg.max_grad_norm == 0.5  # from YAML: no flag given
    assert cfg.epochs == 4  # the flag wins
    assert cfg == load_config(FinetuneConfig, path, epochs=4)


def test_json_alias_and_bad_choice(monkeypatch):
    seen = {}
    monkeypatch.setattr(importlib.import_module("specialize.evaluate.run"), "run_eval",
                        lambda cfg: seen.setdefault("cfg", cfg))
    assert CliRunner().invoke(app, ["eval", "--json", "--predictions", "p.jsonl"]).exit_code == 0
    assert seen["cfg"].json_output is True
    bad = CliRunner().invoke(app, ["finetune", "--method", "adapter"])
    assert bad.exit_code == 2 and re.search(r"'adapter' is not one of", bad.output)


def test_shell_completion_script(monkeypatch):
    # typer's --show-completion is a flag: the shell comes from shellingham, which reads the parent
    # processes; a test run detached from any shell (nohup, a CI runner's daemon) has none, so the
    # user's bash is stood in for here.
    import typer.completion

    monkeypatch.setattr(typer.completion, "_get_shell_name", lambda: "bash")
    result = CliRunner().invoke(app, ["--show-completion"], prog_name="specialize")
    assert result.exit_code == 0, (result.output, result.exception)
    assert "_SPECIALIZE_COMPLETE" in result.output and "complete" in result.output


def test_number_lists_take_commas_and_repeats(monkeypatch):
    """`--fractions 0.1,0.25` is one value the config splits (typer alone would refuse it as a float)."""
    seen = []
    monkeypatch.setattr(importlib.import_module("specialize.curve"), "run_curve", seen.append)
    for args in (["--fractions", "0.5,0.1"], ["--fractions", "0.1", "--fractions", "0.5"]):
        result = CliRunner().invoke(app, ["curve", "--base", "b", *args])
        assert result.exit_code == 0, result.output
    assert [cfg.fractions for cfg in seen] == [[0.1, 0.5], [0.1, 0.5]]
    default = CliRunner().invoke(app, ["curve", "--base", "b"])
    assert default.exit_code == 0 and seen[-1].fractions == [0.1, 0.25, 0.5, 1.0]
    bad = CliRunner().invoke(app, ["curve", "--base", "b", "--fractions", "0,2"])
    assert bad.exit_code != 0


def test_no_progress_also_silences_the_libraries_bars(monkeypatch):
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    monkeypatch.setattr(importlib.import_module("specialize.finetune"), "finetune", lambda cfg: None)
    hf_logging.enable_progress_bar()  # an earlier in-process --no-progress run may have switched them off
    enable_progress_bars()
    try:
        assert CliRunner().invoke(app, ["finetune", "--base", "b"]).exit_code == 0
        assert hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
        assert CliRunner().invoke(app, ["finetune", "--base", "b", "--no-progress"]).exit_code == 0
        assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
    finally:  # global switches: the rest of the suite keeps its defaults
        hf_logging.enable_progress_bar()
        enable_progress_bars()
