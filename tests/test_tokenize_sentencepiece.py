"""SentencePiece-style tokenizers (Llama-2, Mistral, Gemma): training ids are inference ids.

Their Metaspace pre-tokenizer puts `▁` at the start of every string it tokenises, so a
conversation tokenised piece by piece is not the conversation tokenised at once, as inference
tokenises its prompt. The same assertions run on the byte-level BPE from conftest, where both agree.
"""

from __future__ import annotations

import copy

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from helpers import ASSETS, corpus
from specialize.data.formats import Example, load_examples
from specialize.data.lint import check_examples
from specialize.data.templates import ours
from specialize.data.tokenize import IGNORE, encode_chat

MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What do bees make?"},
            {"role": "assistant", "content": "Bees make honey."},
            {"role": "user", "content": "And what do they eat?"},
            {"role": "assistant", "content": "They eat nectar and pollen."}]
CONVERSATION = Example(messages=MESSAGES, shape="messages", source="t.jsonl:1")
ASSISTANT_TURNS = [i for i, m in enumerate(MESSAGES) if m["role"] == "assistant"]
AFTER_EOS = {"qa": "", "chatml": "\n"}  # what each template renders after an answer's EOS


def sentencepiece_tokenizer(prepend_scheme: str) -> PreTrainedTokenizerFast:
    """A BPE with a Metaspace pre-tokenizer, as Llama-2, Mistral and Gemma convert to `tokenizers`."""
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "</s>", "<pad>"], show_progress=False)
    core.train_from_iterator(corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def sentencepiece() -> PreTrainedTokenizerFast:
    return sentencepiece_tokenizer("first")  # Llama-2 / Mistral as converted today (legacy=False)


@pytest.fixture(scope="module")
def sentencepiece_always() -> PreTrainedTokenizerFast:
    return sentencepiece_tokenizer("always")  # legacy Llama-2: a `▁` also after every special token


@pytest.fixture(params=["sentencepiece", "sentencepiece_always", "byte-level"])
def tokenizer(request):
    if request.param == "byte-level":
        return AutoTokenizer.from_pretrained(request.getfixturevalue("tokenizer_dir"))
    return request.getfixturevalue(request.param)


class WithoutOffsets:
    """A fast tokenizer posing as a slow one: without offsets, encode_chat tokenises piece by piece."""

    is_fast = False

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def trained_runs(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of trained labels: one per assistant turn."""
    runs: list[tuple[int, int]] = []
    for i, label in enumerate(labels):
        if label == IGNORE:
            continue
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def inference_prompts(tokenizer, template) -> list[list[int]]:
    """The ids a model is prompted with before each assistant turn, as generate and serve build them."""
    return [ids(tokenizer, template.render(tokenizer, MESSAGES[:i], add_generation_prompt=True))
            for i in ASSISTANT_TURNS]


@pytest.mark.parametrize("name", ["qa", "chatml"])
def test_conversation_ids_equal_the_rendered_text_tokenised_at_once(tokenizer, name):
    template = ours(name, tokenizer)
    item = encode_chat(CONVERSATION, tokenizer, template)
    assert item.input_ids == ids(tokenizer, template.render(tokenizer, MESSAGES, add_generation_prompt=False))


@pytest.mark.parametrize("name", ["qa", "chatml"])
def test_every_turn_is_trained_right_after_its_inference_prompt(tokenizer, name):
    template = ours(name, tokenizer)
    item = encode_chat(CONVERSATION, tokenizer, template)
    prompts = inference_prompts(tokenizer, template)
    assert [start for start, _ in trained_runs(item.labels)] == [len(prompt) for prompt in prompts]
    for prompt in prompts:
        assert item.input_ids[: len(prompt)] == prompt


# Legacy "always" is left out: it puts a `▁` after the EOS too, trained and decoded as a space.
@pytest.mark.parametrize("tokenizer", ["sentencepiece", "byte-level"], indirect=True)
@pytest.mark.parametrize("name", ["qa", "chatml"])
def test_trained_tokens_decode_to_each_answer_and_its_eos(tokenizer, name):
    item = encode_chat(CONVERSATION, tokenizer, ours(name, tokenizer))
    trained = [tokenizer.decode(item.input_ids[a:b], clean_up_tokenization_spaces=False)
               for a, b in trained_runs(item.labels)]
    assert trained == [MESSAGES[i]["content"] + tokenizer.eos_token + AFTER_EOS[name] for i in ASSISTANT_TURNS]


def test_train_on_prompt_trains_every_token_but_the_first(tokenizer):
    item = encode_chat(CONVERSATION, tokenizer, ours("chatml", tokenizer), train_on_prompt=True)
    assert item.labels == [IGNORE] + item.input_ids[1:]


@pytest.mark.parametrize("name", ["qa", "chatml"])
def test_piece_by_piece_matches_inference_only_for_byte_level(tokenizer, name):
    """The fallback for tokenizers without offsets (and the encoding before offsets were used)."""
    template = ours(name, tokenizer)
    piecewise = encode_chat(CONVERSATION, WithoutOffsets(tokenizer), template)
    whole = ids(tokenizer, template.render(tokenizer, MESSAGES, add_generation_prompt=False))
    second_prompt = inference_prompts(tokenizer, template)[1]
    if not isinstance(tokenizer.backend_tokenizer.pre_tokenizer, pre_tokenizers.Metaspace):  # byte-level
        assert piecewise == encode_chat(CONVERSATION, tokenizer, template)
        return
    # Each piece tokenised alone starts with `▁`: "Bees make honey." alone is ['▁', 'B', 'e', 'es', ...]
    # (ids 97, 36, 71, 422, ... here), after "### Answer:\n" it is ['B', 'e', 'es', ...] (36, 71, 422, ...).
    # So the ids differ from inference's, and from the second turn on even the prompt does
    # (lint's template_roundtrip).
    assert tokenizer.convert_ids_to_tokens(ids(tokenizer, "Bees make honey."))[0].startswith("▁")
    assert piecewise.input_ids != whole
    assert piecewise.input_ids[: len(second_prompt)] != second_prompt


# Legacy "always" is left out: the rest after a cut follows EOS, where it puts a `▁`.
@pytest.mark.parametrize("tokenizer", ["sentencepiece", "byte-level"], indirect=True)
def test_a_merge_across_an_answer_start_is_cut_so_the_prompt_stays_the_inference_prompt(tokenizer):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens(["\nBees"])  # "### Answer:\n" + "Bees make honey.": one token across the start
    merged = tokenizer.convert_tokens_to_ids("\nBees")
    template = ours("qa", tokenizer)
    assert merged in ids(tokenizer, template.render(tokenizer, MESSAGES, add_generation_prompt=False))
    item = encode_chat(CONVERSATION, tokenizer, template)
    prompt = inference_prompts(tokenizer, template)[0]
    assert merged not in item.input_ids
    assert item.input_ids[: len(prompt)] == prompt
    assert trained_runs(item.labels)[0][0] == len(prompt)
    # The rest is tokenised as a continuation: no `▁` where the text was cut.
    assert tokenizer.decode(item.input_ids, clean_up_tokenization_spaces=False) == \
        template.render(tokenizer, MESSAGES, add_generation_prompt=False)


def test_a_token_across_an_answer_end_is_trained(sentencepiece):
    tokenizer = copy.deepcopy(sentencepiece)
    tokenizer.add_tokens(["\n<|im_start|>"])  # once after each EOS: the first answer's ends in "</s>\n"
    merged = tokenizer.convert_tokens_to_ids("\n<|im_start|>")
    item = encode_chat(CONVERSATION, tokenizer, ours("chatml", tokenizer))
    # After the system message, the first question, the first answer, the second question.
    assert [label != IGNORE for token, label in zip(item.input_ids, item.labels) if token == merged] == \
        [False, False, True, False]


def test_lint_finds_no_roundtrip_error_in_multi_turn_data(sentencepiece):
    examples = load_examples([str(ASSETS / "lint" / "chat.jsonl")])
    template = ours("chatml", sentencepiece)
    assert check_examples(examples, [], sentencepiece, template, None) == []
    # Piece by piece, the second turn's prompt is not the inference prompt, and lint would block finetune.
    piecewise = check_examples(examples, [], WithoutOffsets(sentencepiece), template, None)
    assert [(f.code, f.sources) for f in piecewise] == [("template_roundtrip", [examples[0].source])]
