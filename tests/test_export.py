"""export: a standalone HF folder that plain transformers loads, answering exactly like the run."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import QA8
from test_ollama import ollama_prompt, parse_modelfile, write_converter
from typer.testing import CliRunner

from specialize.cli import app
from specialize.config import ExportConfig, FinetuneConfig
from specialize.errors import UserError
from specialize.export import GENERIC_PROMPTS, MARKER, export, parity_conversations
from specialize.finetune import finetune
from specialize.generate import generate_answers

# The package attribute `specialize.export` is the function (specialize/__init__.py); the module is this.
export_module = importlib.import_module("specialize.export")
QUESTIONS = [json.loads(line)["question"] for line in QA8.read_text(encoding="utf-8").splitlines()]

# Runs in a fresh interpreter that never imports specialize or peft: what a vLLM or plain
# transformers user has. It renders the prompt with the exported chat template alone.
PLAIN_TRANSFORMERS = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, questions = sys.argv[1], json.loads(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder)
answers = []
for q in questions:
    text = tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=40, do_sample=False)
    answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
assert "specialize" not in sys.modules and "peft" not in sys.modules, "imported specialize or peft"
print(json.dumps(answers))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama) -> dict[str, Path]:
    """A full run and a LoRA run; a short training is enough, parity does not need right answers."""
    root = tmp_path_factory.mktemp("export-runs")
    common = dict(base=str(tiny_llama), data=[str(QA8)], micro_batch_size=8, warmup_steps=0, progress=False)
    return {"full": finetune(FinetuneConfig(out=root / "full", epochs=20, learning_rate=5e-3, **common)),
            "lora": finetune(FinetuneConfig(out=root / "lora", method="lora", lora_rank=8, epochs=40,
                                            learning_rate=1e-2, **common))}


def test_lora_export_loads_without_peft_and_answers_like_specialize_generate(runs, tiny_llama, tmp_path, capsys):
    out = export(ExportConfig(model=str(runs["lora"]), out=tmp_path / "lora-export"))
    assert "parity: 8/8 identical" in capsys.readouterr().out
    files = {p.name for p in out.iterdir()}
    assert not {"adapter_config.json", "adapter_model.safetensors"} & files
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"} <= files
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folder left

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    plain = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, str(out), json.dumps(QUESTIONS[:4])],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=False)
    assert plain.returncode == 0, plain.stderr
    expected = [c.text for c in generate_answers(str(runs["lora"]), QUESTIONS[:4], max_new_tokens=40)]
    assert json.loads(plain.stdout.splitlines()[-1]) == expected
    base = [c.text for c in generate_answers(str(tiny_llama), QUESTIONS[:4], max_new_tokens=40)]
    assert base != expected  # the adapter changes the answers, so the merge really carried it


def test_export_carries_the_runs_chat_template_and_generation_ids(runs, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    out = export(ExportConfig(model=str(runs["lora"]), out=tmp_path / "e", parity_prompts=0))
    run_tokenizer = AutoTokenizer.from_pretrained(runs["lora"] / "model")
    exported = AutoTokenizer.from_pretrained(out)
    assert exported.chat_template and exported.chat_template == run_tokenizer.chat_template
    generation = GenerationConfig.from_pretrained(out)
    assert generation.eos_token_id == exported.eos_token_id and generation.pad_token_id is not None


def test_export_keeps_the_end_of_turn_tokens_of_the_runs_generation_config(runs, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    run = tmp_path / "instruct-run"  # a run whose base ends turns with a token of its own (id 7)
    shutil.copytree(runs["full"], run)
    eos = AutoTokenizer.from_pretrained(run / "model").eos_token_id
    settings = json.loads((run / "model" / "generation_config.json").read_text())
    (run / "model" / "generation_config.json").write_text(json.dumps(settings | {"eos_token_id": [7, eos]}))
    out = export(ExportConfig(model=str(run), out=tmp_path / "e", parity_prompts=2))
    assert GenerationConfig.from_pretrained(out).eos_token_id == [eos, 7]  # tokenizer EOS first


def test_full_run_exports_through_the_cli_and_re_exports_in_place(runs, tmp_path):
    out = tmp_path / "full-export"
    for _ in range(2):  # the second export replaces the first (it carries our marker)
        result = CliRunner().invoke(app, ["export", "--model", str(runs["full"]), "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert "parity: 8/8 identical" in result.output
    info = json.loads((out / MARKER).read_text(encoding="utf-8"))
    assert info["prompts"][0]["messages"] == [{"role": "user", "content": QUESTIONS[0]}]  # from the run's data
    assert info["method"] == "full weights re-saved"


def test_dtype_is_written_to_the_config(runs, tmp_path, capsys):
    out = export(ExportConfig(model=str(runs["full"]), out=tmp_path / "bf16", dtype="bf16", parity_prompts=0))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert "parity: skipped" in capsys.readouterr().out


def test_an_export_that_answers_differently_fails_and_is_kept_aside(runs, tmp_path, monkeypatch):
    def answers(ref, conversations, trust_remote_code):  # the export answers differently on prompt 2
        return ["same", "after" if Path(ref).name.startswith(".") else "before"][: len(conversations)]

    monkeypatch.setattr(export_module, "_answers", answers)
    out = tmp_path / "broken"
    with pytest.raises(UserError, match=r"parity: 1/2 identical.*prompt 2.*'before'.*'after'"):
        export(ExportConfig(model=str(runs["full"]), out=out, parity_prompts=2))
    assert not out.exists()
    assert (tmp_path / "broken.parity-failed" / "model.safetensors").is_file()


def test_export_never_overwrites_a_folder_it_did_not_write(runs, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a specialize export"):
        export(ExportConfig(model=str(runs["full"]), out=tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_parity_prompts_come_from_the_training_data_else_generic(runs, tmp_path):
    assert parity_conversations(runs["full"], 3) == [[{"role": "user", "content": q}] for q in QUESTIONS[:3]]
    assert parity_conversations(tmp_path, 2) == [[{"role": "user", "content": p}] for p in GENERIC_PROMPTS[:2]]
    assert parity_conversations(runs["full"], 0) == []


def test_a_model_without_chat_template_is_refused_before_any_work(tiny_llama, tmp_path, monkeypatch):
    # tiny_llama (conftest) is a plain base: no chat template, like a `specialize pretrain` run.
    monkeypatch.setattr(export_module, "_answers", lambda *a, **k: pytest.fail("generated before checking"))
    with pytest.raises(UserError, match="has no chat template to export"):
        export(ExportConfig(model=str(tiny_llama), out=tmp_path / "ex"))
    assert list(tmp_path.iterdir()) == []  # no folder, no hidden temporary one


def test_the_modelfile_prompts_like_training_with_the_runs_system_prompt_and_stops(runs, tmp_path, capsys):
    run = tmp_path / "system-run"  # the full run, as if trained with --system-prompt
    shutil.copytree(runs["full"], run)
    from transformers import AutoTokenizer

    from specialize.data.templates import Template, install_template

    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    install_template(tokenizer, Template("qa", tokenizer.chat_template), "Answer from the docs.")
    tokenizer.save_pretrained(run / "model")
    out = export(ExportConfig(model=str(run), out=tmp_path / "faq", parity_prompts=0))
    assert f"ollama: {out / 'Modelfile'} (template: qa); ollama create faq -f {out / 'Modelfile'}" \
        in capsys.readouterr().out
    text = (out / "Modelfile").read_text(encoding="utf-8")
    commands = parse_modelfile(text)
    assert commands[0] == ("model", ".") and ("system", "Answer from the docs.") in commands
    assert [v for c, v in commands if c == "stop"] == [tokenizer.eos_token]
    exported = AutoTokenizer.from_pretrained(out)
    for conversation in parity_conversations(run, 8):  # the run's training prompts, and one with its own system
        for messages in (conversation, [{"role": "system", "content": "Be terse."}] + conversation):
            training = exported.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            assert exported(ollama_prompt(text, messages))["input_ids"] == \
                exported(training, add_special_tokens=False)["input_ids"]
    assert json.loads((out / MARKER).read_text())["ollama"] == {"modelfile": "Modelfile", "template": "qa",
                                                                "why": None, "from": "."}


def test_gguf_converts_with_llama_cpps_converter_and_the_modelfile_imports_it(runs, tmp_path, monkeypatch):
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir()
    script = write_converter(bin_dir, calls)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    out = tmp_path / "faq"
    result = CliRunner().invoke(app, ["export", "--model", str(runs["full"]), "--out", str(out), "--gguf",
                                      "--parity-prompts", "0", "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert json.loads(calls.read_text()) == [str(script), str(out), "--outfile", str(out / "faq.gguf"),
                                             "--outtype", "bf16"]
    assert parse_modelfile((out / "Modelfile").read_text())[0] == ("model", "./faq.gguf")
    assert json.loads((out / MARKER).read_text())["ollama"]["from"] == "./faq.gguf"
    assert f"gguf: {out / 'faq.gguf'} (the Modelfile imports it)" in result.output


def test_gguf_without_the_converter_prints_the_command_and_imports_the_folder(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable))  # python, but no convert_hf_to_gguf.py
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    out = tmp_path / "faq"
    result = CliRunner().invoke(app, ["export", "--model", str(runs["full"]), "--out", str(out), "--gguf",
                                      "--parity-prompts", "0"])
    assert result.exit_code == 0, result.output
    assert f"python llama.cpp/convert_hf_to_gguf.py {out} --outfile {out / 'faq.gguf'} --outtype f32" in result.output
    assert parse_modelfile((out / "Modelfile").read_text())[0] == ("model", ".")
    assert not (out / "faq.gguf").exists()
