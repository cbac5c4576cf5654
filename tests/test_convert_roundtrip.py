"""Every file `specialize convert` writes is accepted by `lint` and by `finetune`'s data path (one per
converter), and finetune trains on the chat converter's tool-calling output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import ASSETS, write_jsonl
from test_convert_llm import FakeLLM, _config
from transformers import AutoTokenizer

from specialize.config import ConvertConfig, FinetuneConfig, LintConfig
from specialize.data.convert import convert, llm
from specialize.data.formats import load_examples
from specialize.data.lint import check_examples, lint
from specialize.data.templates import resolve_template
from specialize.data.tokenize import encode_examples
from specialize.finetune import finetune

CONVERT = ASSETS / "convert"
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL_CHATS = [
    {"tools": [WEATHER], "parallel_tool_calls": True, "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "You are Parcelly's assistant."}]},
        {"role": "assistant", "content": "Hi! How can I help?"},  # a greeting before the customer: cut
        {"role": "user", "content": "Will my parcel to Oslo be delayed by weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "storm warning"},
        {"role": "assistant", "content": "A storm is expected in Oslo; allow one extra day.", "weight": 1},
        {"role": "user", "content": "thanks"}]},  # trailing, unanswered: cut
    {"messages": [{"role": "user", "content": "Do you ship to Iceland?"},
                  {"role": "assistant", "content": [{"type": "text", "text": "Yes, in 5 to 7 days."}]}]},
]


def _chat_jsonl(tmp_path: Path) -> list[str]:
    return [str(write_jsonl(tmp_path / "chats.jsonl", TOOL_CHATS))]


CASES = {
    "faq_html": lambda tmp: [str(p) for p in sorted((CONVERT / "faq").glob("*.html"))],
    "faq_markdown_text": lambda tmp: [str(CONVERT / "faq" / n) for n in ("github_faq.md", "plain_qa.txt")],
    "chat_jsonl_tools": _chat_jsonl,
    "chat_csv": lambda tmp: [str(CONVERT / "chat" / "transcripts.csv")],
    "slack": lambda tmp: [str(CONVERT / "slack" / "export")],
}


def _accepted(out: Path, tokenizer, capsys) -> list:
    """What finetune does with the file before training (read, template, encode, its lint), and lint itself."""
    examples = load_examples([str(out)])
    template = resolve_template("auto", tokenizer, {e.shape for e in examples})
    items, report = encode_examples(examples, tokenizer, template, max_seq_tokens=4096)
    assert len(items) == len(examples) and not report.dropped
    errors = [f for f in check_examples(examples, [], tokenizer, template, 4096, for_training=True)
              if f.severity == "error"]
    assert errors == []
    code = lint(LintConfig(data=[str(out)]))
    printed = capsys.readouterr().out
    assert code == 0, printed
    return examples


@pytest.mark.parametrize("case", CASES)
def test_every_converter_output_is_accepted_by_lint_and_finetune(tmp_path, tokenizer_dir, capsys, case):
    out = tmp_path / "data.jsonl"
    summary = convert(ConvertConfig(inputs=CASES[case](tmp_path), to=out), progress=False)
    assert summary.produced > 0
    examples = _accepted(out, AutoTokenizer.from_pretrained(tokenizer_dir), capsys)
    assert len(examples) == summary.produced


def test_llm_generator_output_is_accepted(tmp_path, tokenizer_dir, capsys, monkeypatch):
    monkeypatch.setattr(llm, "BACKOFF_S", 0.0)
    fake = FakeLLM()
    try:
        cfg = _config(tmp_path, fake.url)
        summary = convert(cfg, progress=False)
    finally:
        fake.server.shutdown()
        fake.server.server_close()
    assert summary.produced == 3
    _accepted(cfg.to, AutoTokenizer.from_pretrained(tokenizer_dir), capsys)


def test_chat_converter_keeps_tool_calling_fields(tmp_path):
    out = tmp_path / "data.jsonl"
    convert(ConvertConfig(inputs=_chat_jsonl(tmp_path), to=out), progress=False)
    first = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    assert first["tools"] == [WEATHER] and first["parallel_tool_calls"] is True
    assert [m["role"] for m in first["messages"]] == ["developer", "user", "assistant", "tool", "assistant"]


def test_finetune_trains_on_its_converters_tool_output(tmp_path, tiny_llama):
    out = tmp_path / "data.jsonl"
    convert(ConvertConfig(inputs=_chat_jsonl(tmp_path), to=out), progress=False)
    run = finetune(FinetuneConfig(base=str(tiny_llama), data=[str(out)], out=tmp_path / "run", max_steps=2,
                                  micro_batch_size=2, progress=False))
    assert run.read_summary()["train_loss"] > 0
    saved = AutoTokenizer.from_pretrained(run.model)
    assert "<tool_call>" in saved.chat_template and "<tools>" in saved.chat_template  # chatml with tools, saved
