"""chat: scripted turns through `chat_loop` with a tiny fine-tuned run.

Streamed answers must equal `Generator.generate` on the same history (multi-turn included).
"""

from __future__ import annotations

from pathlib import Path

import pytest


from specialize.chat import chat, chat_loop
from specialize.config import ChatConfig
from specialize.errors import UserError
from specialize.generate import Generator

TOKENS = 24  # enough for the trained answers


@pytest.fixture(scope="module")
def run(qa8_run) -> Path:
    return qa8_run


@pytest.fixture(scope="module")
def generator(run) -> Generator:
    return Generator.load(run)


class Script:
    """Feeds lines to `input_fn` (then EOF) and records what the chat writes and renders."""

    def __init__(self, generator: Generator, lines: list[str]):
        self.lines = list(lines)
        self.pieces: list[str] = []
        self.rendered: list[list[dict[str, str]]] = []  # the messages of every prompt rendered
        self.generator = generator
        original = generator.prompt_ids
        self.restore = lambda: setattr(generator, "prompt_ids", original)
        generator.prompt_ids = lambda messages: self.rendered.append([dict(m) for m in messages]) or original(messages)

    def input(self, prompt: str) -> str:
        if not self.lines:
            raise EOFError
        return self.lines.pop(0)

    def write(self, piece: str) -> None:
        self.pieces.append(piece)

    def run(self, cfg: ChatConfig) -> list[dict[str, str]]:
        try:
            return chat_loop(self.generator, cfg, self.input, self.write)
        finally:
            self.restore()


def answer(generator: Generator, messages: list[dict[str, str]]) -> str:
    return generator.generate([messages], max_new_tokens=TOKENS)[0].text


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def test_answers_stream_and_equal_generate_on_the_whole_history(generator):
    script = Script(generator, ["What do bees make?", "And who wrote Hamlet?", "/exit", "never read"])
    history = script.run(ChatConfig(model="x", max_new_tokens=TOKENS))
    first = answer(generator, [user("What do bees make?")])
    second = answer(generator, [user("What do bees make?"), {"role": "assistant", "content": first},
                                user("And who wrote Hamlet?")])
    assert first == "Bees make honey."  # the trained answer, streamed
    assert "".join(script.pieces) == f"{first}\n{second}\n"
    assert len(script.pieces) > 4  # streamed piece by piece, not one string per answer
    assert history == [user("What do bees make?"), {"role": "assistant", "content": first},
                       user("And who wrote Hamlet?"), {"role": "assistant", "content": second}]
    assert script.lines == ["never read"]  # /exit stopped reading


def test_reset_forgets_the_conversation_but_keeps_the_system_prompt(generator):
    script = Script(generator, ["What do bees make?", "/reset", "Who wrote Hamlet?"])
    history = script.run(ChatConfig(model="x", max_new_tokens=TOKENS, system_prompt="Be brief."))
    system = {"role": "system", "content": "Be brief."}
    assert script.rendered == [[system, user("What do bees make?")], [system, user("Who wrote Hamlet?")]]
    assert "(conversation cleared)\n" in script.pieces
    assert history[:2] == [system, user("Who wrote Hamlet?")] and len(history) == 3
    assert history[2]["content"] == answer(generator, [system, user("Who wrote Hamlet?")])


def test_eof_ends_the_chat_and_blank_lines_and_help_are_not_sent(generator):
    script = Script(generator, ["", "   ", "/help"])
    assert script.run(ChatConfig(model="x")) == []
    assert script.rendered == [] and any("/reset" in p for p in script.pieces)


def test_oldest_turns_are_dropped_to_fit_the_context(generator):
    long = "water boils " * 40  # ~200 tokens with the test tokenizer; the tiny model's context is 512
    script = Script(generator, [long + "one", long + "two", long + "three"])
    script.run(ChatConfig(model="x", max_new_tokens=TOKENS))
    assert any("dropped" in p for p in script.pieces)
    assert script.rendered[-1][0]["content"] != long + "one" and script.rendered[-1][-1] == user(long + "three")
    assert len(generator.prompt_ids(script.rendered[-1])) + TOKENS <= 512


def test_ctrl_c_stops_an_answer_and_forgets_the_unanswered_message(generator):
    script = Script(generator, ["What do bees make?", "Who wrote Hamlet?"])
    interrupted = []

    def write(piece: str) -> None:
        if not interrupted and script.rendered:  # the first piece of the first answer
            interrupted.append(piece)
            raise KeyboardInterrupt
        script.pieces.append(piece)

    script.write = write
    history = script.run(ChatConfig(model="x", max_new_tokens=TOKENS))
    assert "\n(stopped)\n" in script.pieces
    assert [m["content"] for m in history if m["role"] == "user"] == ["Who wrote Hamlet?"]


def test_chat_without_a_model_is_a_user_error():
    with pytest.raises(UserError, match="no model"):
        chat(ChatConfig())
