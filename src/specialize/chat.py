"""`specialize chat`: an interactive terminal chat with a run, answers streamed as they are generated.

    specialize chat --model runs/faq

The whole conversation is kept and rendered by the run's own chat template every turn, exactly
as in training. `/reset` forgets it, `/exit` (or Ctrl-D) quits, Ctrl-C stops an answer.

Answers come from `Generator.stream_ids`, which generates in this thread (so Ctrl-C stops it at
once) and whose pieces join to exactly the answer `Generator.generate` gives for the same history.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from specialize.config import ChatConfig
from specialize.errors import UserError
from specialize.generate import Generator

HELP = "/reset clears the conversation, /exit or Ctrl-D quits, Ctrl-C stops an answer"


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _fit(generator: Generator, history: list[dict[str, str]], max_new_tokens: int) -> tuple[list[int], int]:
    """Prompt ids for the history, dropping the oldest turns until prompt + answer fit the context."""
    context = generator.context_length
    dropped = 0
    while True:
        ids = generator.prompt_ids(history)
        if context is None or len(ids) + max_new_tokens <= context:
            return ids, dropped
        first = next(i for i, m in enumerate(history) if m["role"] != "system")
        if first == len(history) - 1:  # only the new message is left, and it does not fit
            raise ValueError(f"message too long: {len(ids)} tokens + {max_new_tokens} to answer > context {context}")
        # Drop the oldest user message and the answer to it, keeping the system prompt.
        end = first + 1
        while end < len(history) - 1 and history[end]["role"] == "assistant":
            end += 1
        del history[first:end]
        dropped += 1


def chat_loop(generator: Generator, cfg: ChatConfig, input_fn: Callable[[str], str] = input,
              write_fn: Callable[[str], None] = _write_stdout) -> list[dict[str, str]]:
    """Read a message, stream the answer, repeat. Returns the history when the user quits.

    Args:
        input_fn: called with the prompt string, returns one line; EOFError ends the chat.
        write_fn: called with each piece of output (answers arrive piece by piece).
    """
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    history = list(system)
    while True:
        try:
            line = input_fn("> ")
        except EOFError:
            write_fn("\n")
            return history
        except KeyboardInterrupt:  # at the prompt Ctrl-C only clears the line, as in a shell
            write_fn(f"\n({HELP})\n")
            continue
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return history
        if command == "/reset":
            history = list(system)
            write_fn("(conversation cleared)\n")
            continue
        if command == "/help":
            write_fn(f"({HELP})\n")
            continue
        history.append({"role": "user", "content": line})
        try:
            ids, dropped = _fit(generator, history, cfg.max_new_tokens)
        except ValueError as e:
            history.pop()
            write_fn(f"({e})\n")
            continue
        if dropped:
            write_fn(f"(dropped the {dropped} oldest turn(s) to fit the model's context)\n")
        try:
            completion = generator.stream_ids(ids, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                              top_p=cfg.top_p, on_text=write_fn)
        except KeyboardInterrupt:  # stop this answer; the unanswered message is forgotten
            history.pop()
            write_fn("\n(stopped)\n")
            continue
        write_fn("\n")
        history.append({"role": "assistant", "content": completion.text})


def chat(cfg: ChatConfig) -> None:
    """Load the run and chat on the terminal until /exit or Ctrl-D."""
    if not cfg.model:
        raise UserError("no model given (use --model RUN)")
    try:
        import readline  # noqa: F401  (line editing and history for input(), where available)
    except ImportError:
        pass
    generator = Generator.load(cfg.model, trust_remote_code=cfg.trust_remote_code)
    torch.manual_seed(cfg.seed)  # sampling (temperature > 0) is reproducible per session
    _write_stdout(f"chatting with {cfg.model} (template '{generator.template.name}'); {HELP}\n")
    chat_loop(generator, cfg)
