"""Per-turn `weight` (OpenAI's fine-tuning chat format): weight 0 keeps an assistant turn as context only."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from helpers import write_jsonl
from specialize.data.formats import load_examples
from specialize.data.lint import check_examples
from specialize.data.templates import Template, ours, segments
from specialize.data.tokenize import IGNORE, encode_chat, encode_examples
from specialize.errors import UserError


NONE = object()
AFTER_EOS = {"qa": "", "chatml": "\n"}  # what each template renders after an answer's EOS


def conversation(first_weight=NONE, second_weight=NONE) -> list[dict]:
    first = {"role": "assistant", "content": "Bees make honey."}
    second = {"role": "assistant", "content": "They eat nectar."}
    if first_weight is not NONE:
        first["weight"] = first_weight
    if second_weight is not NONE:
        second["weight"] = second_weight
    return [{"role": "user", "content": "What do bees make?"}, first,
            {"role": "user", "content": "And what do they eat?"}, second]


@pytest.fixture(params=["tiny_llama", "tiny_gpt2"])
def tokenizer(request):
    return AutoTokenizer.from_pretrained(request.getfixturevalue(request.param))


def load(tmp_path, *messages: list[dict]):
    return load_examples([str(write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in messages]))])


def trained_text(item, tokenizer) -> str:
    return tokenizer.decode([label for label in item.labels if label != IGNORE])


@pytest.mark.parametrize("name", ["qa", "chatml"])
def test_weight_0_turn_is_context_not_trained(tmp_path, tokenizer, name):
    template = ours(name, tokenizer)
    weighted, plain = load(tmp_path, conversation(first_weight=0, second_weight=1), conversation())
    assert weighted.messages[1]["weight"] == 0 and "weight" not in plain.messages[1]
    item, full = encode_chat(weighted, tokenizer, template), encode_chat(plain, tokenizer, template)
    assert item.input_ids == full.input_ids  # the turn stays in the sequence
    assert trained_text(item, tokenizer) == "They eat nectar." + tokenizer.eos_token + AFTER_EOS[name]
    masked = [token for token, a, b in zip(full.input_ids, item.labels, full.labels) if a != b]
    assert [a for a, b in zip(item.labels, full.labels) if a != b] == [IGNORE] * len(masked)
    assert tokenizer.decode(masked) == "Bees make honey." + tokenizer.eos_token + AFTER_EOS[name]  # that turn only


def test_weight_never_reaches_the_template(tmp_path, tiny_gpt2):
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    shows_weight = Template("shows_weight", "{%- for m in messages -%}{{ m['role'] + ': ' + m['content'] }}"
                            "{%- if 'weight' in m %} [weight]{% endif %}{{ eos_token }}{%- endfor -%}"
                            "{%- if add_generation_prompt %}assistant: {% endif -%}")
    [example] = load(tmp_path, conversation(first_weight=0, second_weight=1))
    pieces = segments(shows_weight, tokenizer, example.messages)
    assert not any("[weight]" in text for text, _ in pieces)
    assert [trained for _, trained in pieces] == [False, False, False, True]
    assert "[weight]" not in shows_weight.render(tokenizer, example.prompt_messages, add_generation_prompt=True)
    assert example.messages[1]["weight"] == 0  # the example itself is left as loaded


def test_all_turns_weight_0_is_no_trained_token(tmp_path, tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    template = ours("qa", tokenizer)
    [silent] = load(tmp_path, conversation(first_weight=0, second_weight=0.0))
    with pytest.raises(UserError, match=r"nothing left to train on: dropped 1 example\(s\): no trained token .*"
                                        r"\(first: .*chat.jsonl:1\)"):
        encode_examples([silent], tokenizer, template, max_seq_tokens=512)
    findings = check_examples([silent], [], tokenizer, template, max_seq_tokens=512)
    assert [(f.severity, f.code, f.sources) for f in findings] == [("error", "no_trained_tokens", [silent.source])]


@pytest.mark.parametrize("weight", [2, "yes", True, None, 0.5, "0"])
def test_bad_weight_names_file_line_field(tmp_path, weight):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": conversation(first_weight=weight)}) + "\n", encoding="utf-8")
    message = rf"chat.jsonl:1: field 'messages\[1\].weight': expected 0 or 1, got {weight!r}$"
    with pytest.raises(UserError, match=message):
        load_examples([str(path)])


def test_weight_on_a_user_turn_is_refused(tmp_path):
    messages = conversation()
    messages[0]["weight"] = 0
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    message = r"chat.jsonl:1: field 'messages\[0\].weight': only assistant turns take a weight"
    with pytest.raises(UserError, match=message):
        load_examples([str(path)])


def test_sharegpt_turns_take_a_weight_too(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"conversations": [
        {"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A.", "weight": 1.0}]}])
    [example] = load_examples([str(path)])
    assert example.messages[1] == {"role": "assistant", "content": "A.", "weight": 1}
