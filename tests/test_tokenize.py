"""Masks, EOS and padding: the classic fine-tuning bugs, pinned."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from specialize.data.formats import Example
from specialize.data.templates import install_template, ours, resolve_template
from specialize.data.tokenize import IGNORE, collate_packed, collate_padded, encode_chat, encode_examples, pad_token_id
from specialize.errors import UserError

QA = Example(messages=[{"role": "user", "content": "What do bees make?"},
                       {"role": "assistant", "content": "Bees make honey."}], shape="qa", source="t.jsonl:1")


@pytest.fixture(params=["tiny_llama", "tiny_gpt2"])
def tokenizer(request):
    return AutoTokenizer.from_pretrained(request.getfixturevalue(request.param))


def test_prompt_masked_answer_and_eos_trained(tokenizer):
    template = ours("qa", tokenizer)
    item = encode_chat(QA, tokenizer, template)
    prompt = tokenizer("### Question:\nWhat do bees make?\n\n### Answer:\n", add_special_tokens=False)["input_ids"]
    answer = tokenizer("Bees make honey.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert item.input_ids == prompt + answer
    assert item.labels == [IGNORE] * len(prompt) + answer
    assert item.labels[-1] == tokenizer.eos_token_id


def test_eos_trained_when_pad_is_eos(tiny_gpt2):
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    short = encode_chat(QA, tokenizer, ours("qa", tokenizer))
    long = encode_chat(Example(messages=[{"role": "user", "content": "A much longer question about bees and honey?"},
                                         {"role": "assistant", "content": "A much longer answer."}]),
                       tokenizer, ours("qa", tokenizer))
    batch = collate_padded([short, long], pad_token_id(tokenizer))
    n = len(short.input_ids)
    # The short row is padded with EOS ids, yet its own EOS is still a target and padding is not.
    assert batch.input_ids[0, n:].eq(tokenizer.eos_token_id).all()
    assert batch.targets[0, n - 2].item() == tokenizer.eos_token_id
    assert batch.targets[0, n - 1:].eq(IGNORE).all()
    assert batch.attention_mask[0].tolist() == [1] * n + [0] * (batch.input_ids.shape[1] - n)
    assert batch.target_tokens == short.target_tokens + long.target_tokens


def test_train_on_prompt_trains_everything_but_first_token(tokenizer):
    item = encode_chat(QA, tokenizer, ours("qa", tokenizer), train_on_prompt=True)
    assert item.labels[0] == IGNORE
    assert item.labels[1:] == item.input_ids[1:]


def test_packed_row_never_targets_across_examples(tokenizer):
    template = ours("qa", tokenizer)
    a, b = encode_chat(QA, tokenizer, template), encode_chat(QA, tokenizer, template)
    batch = collate_packed([a, b])
    n = len(a.input_ids)
    assert batch.input_ids.shape == (1, 2 * n)
    assert batch.position_ids[0].tolist() == list(range(n)) * 2
    assert batch.attention_mask is None
    # The last token of example a must not be trained to predict the first token of b.
    assert batch.targets[0, n - 1].item() == IGNORE
    assert batch.target_tokens == 2 * a.target_tokens


def test_over_long_examples_dropped_and_reported_never_cut(tokenizer):
    template = ours("qa", tokenizer)
    long_answer = Example(messages=[{"role": "user", "content": "Q?"},
                                    {"role": "assistant", "content": "word " * 200}], source="d.jsonl:2")
    long_prompt = Example(messages=[{"role": "user", "content": "word " * 200},
                                    {"role": "assistant", "content": "A."}], source="d.jsonl:3")
    items, report = encode_examples([QA, long_answer, long_prompt], tokenizer, template, max_seq_tokens=64)
    assert len(items) == 1 and items[0].input_ids == encode_chat(QA, tokenizer, template).input_ids
    assert sum(report.dropped.values()) == 2
    lines = "\n".join(report.lines())
    assert "longer than --max-seq-tokens 64 (first: d.jsonl:2)" in lines
    assert "leaves no room for the answer" in lines and "d.jsonl:3" in lines


def test_nothing_left_is_an_error(tokenizer):
    long_prompt = Example(messages=[{"role": "user", "content": "word " * 200},
                                    {"role": "assistant", "content": "A."}], source="d.jsonl:7")
    with pytest.raises(UserError, match=r"nothing left to train on: .*no room for the answer.*d.jsonl:7"):
        encode_examples([long_prompt], tokenizer, ours("qa", tokenizer), max_seq_tokens=32)


def test_multi_turn_chat_trains_every_assistant_turn(tokenizer):
    template = ours("chatml", tokenizer)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye."}]
    item = encode_chat(Example(messages=messages, shape="messages"), tokenizer, template)
    trained = tokenizer.decode([t for t, label in zip(item.input_ids, item.labels) if label != IGNORE])
    eos = tokenizer.eos_token
    assert trained == f"Hello.{eos}\nGoodbye.{eos}\n"


def test_saved_template_reproduces_training_prompt_in_plain_transformers(tmp_path, tokenizer):
    template = resolve_template("auto", tokenizer, {"qa"})
    install_template(tokenizer, template)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    ids = reloaded.apply_chat_template([QA.messages[0]], add_generation_prompt=True, tokenize=True,
                                       return_dict=False)
    item = encode_chat(QA, tokenizer, template)
    prompt_len = item.labels.index(next(label for label in item.labels if label != IGNORE))
    assert ids == item.input_ids[:prompt_len]


def test_padded_and_packed_batches_agree_on_targets(tokenizer):
    template = ours("qa", tokenizer)
    items = [encode_chat(QA, tokenizer, template),
             encode_chat(Example(messages=[{"role": "user", "content": "Why?"},
                                           {"role": "assistant", "content": "Because."}]), tokenizer, template)]
    padded = collate_padded(items, pad_token_id(tokenizer))
    packed = collate_packed(items)
    assert padded.target_tokens == packed.target_tokens
    flat = padded.targets[padded.attention_mask.bool()]
    assert torch.equal(flat, packed.targets[0])
