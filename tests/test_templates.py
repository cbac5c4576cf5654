"""The saved chat template carries the run's system prompt, so every engine prompts as training did."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from specialize.data.templates import install_template, resolve_template, with_default_system

USER = [{"role": "user", "content": "What is 2 + 2?"}]
ODD = 'Say "4" — not {{ 4 }} or {% raw %}, and end with %} \\ 🙂\nThen stop.'


@pytest.mark.parametrize("name", ["qa", "chatml", "alpaca"])
def test_default_system_renders_as_if_the_conversation_had_it(tiny_llama, name):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    template = resolve_template(name, tokenizer)
    install_template(tokenizer, template, system_prompt=ODD)
    with_system = [{"role": "system", "content": ODD}] + USER
    for generation_prompt in (True, False):
        assert (tokenizer.apply_chat_template(USER, tokenize=False, add_generation_prompt=generation_prompt)
                == template.render(tokenizer, with_system, add_generation_prompt=generation_prompt))
    own = [{"role": "system", "content": "Be brief."}] + USER  # a caller's own system message wins
    assert (tokenizer.apply_chat_template(own, tokenize=False, add_generation_prompt=True)
            == template.render(tokenizer, own, add_generation_prompt=True))
    assert ODD in tokenizer.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)


def test_default_system_is_replaced_not_stacked_and_removable():
    once = with_default_system("{{ messages[0]['content'] }}", "first")
    twice = with_default_system(once, "second")
    assert twice.count("specialize: default system message") == 1 and '"second"' in twice
    assert with_default_system(twice, None) == "{{ messages[0]['content'] }}"
    assert with_default_system("\n{{ 'x' }}", "s").endswith("{{ '' }}\n{{ 'x' }}")  # leading newline kept
