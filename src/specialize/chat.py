"""`specialize chat`: an interactive terminal chat with a run, answers streamed as they are generated.

    specialize chat --model runs/faq

The whole conversation is kept and rendered by the run's own chat template every turn, exactly
as in training. `/reset` forgets it, `/exit` (or Ctrl-D) quits, Ctrl-C stops an answer.

This module also holds `stream_answer`, the token-level streaming that `specialize serve` uses
too: it runs generation in the calling thread (so Ctrl-C and cancellation stop it at once),
never hands out part of a stop string, and returns the same `Completion` as
`Generator.generate`, so a streamed answer is the non-streamed one cut into pieces.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from specialize.config import ChatConfig
from specialize.errors import UserError
from specialize.generate import Completion, Generator

HELP = "/reset clears the conversation, /exit or Ctrl-D quits, Ctrl-C stops an answer"


class _TokenSink(BaseStreamer):
    """Receives new token ids from `model.generate`; the first `put` is the prompt and is skipped."""

    def __init__(self, on_tokens: Callable[[list[int]], None]):
        self.on_tokens = on_tokens
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.on_tokens(value.reshape(-1).tolist())  # (1,) or (1, 1): one new token per step

    def end(self) -> None:
        pass


class _Cancelled(StoppingCriteria):
    """Stops generation once `flag()` is true (a server client went away)."""

    def __init__(self, flag: Callable[[], bool]):
        self.flag = flag

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), bool(self.flag()), dtype=torch.bool, device=input_ids.device)


def _safe_end(text: str, stop: list[str]) -> int:
    """How much of `text` can be shown now: never a stop string, nor a piece that may become one."""
    end = len(text)
    for s in stop:
        if s in text:
            end = min(end, text.index(s))
        else:  # the text may end with the start of a stop string that the next token completes
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    end = min(end, len(text) - k)
                    break
    while end > 0 and text[end - 1] == "\ufffd":  # half of a multi-byte character: wait for the rest
        end -= 1
    return end


def stream_answer(generator: Generator, prompt_ids: list[int], on_text: Callable[[str], None], *,
                  max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                  stop: list[str] | None = None, cancelled: Callable[[], bool] | None = None) -> Completion:
    """Generate one answer in this thread, calling `on_text(piece)` as soon as each piece is final.

    The pieces joined are exactly `Completion.text`, which equals what `Generator.generate`
    returns for the same prompt and settings.
    """
    tokenizer = generator.tokenizer
    eos = tokenizer.eos_token_id
    stop = [s for s in stop or [] if s]
    tokens: list[int] = []
    shown = ""

    def on_tokens(new: list[int]) -> None:
        nonlocal shown
        tokens.extend(new)
        visible = tokens[: tokens.index(eos)] if eos in tokens else tokens
        # Decoding the whole answer each step (not token by token) keeps multi-token characters
        # and tokenizers that merge spaces right; answers are short, so the cost is small.
        text = tokenizer.decode(visible, skip_special_tokens=True)
        end = _safe_end(text, stop)
        if end > len(shown) and text.startswith(shown):
            on_text(text[len(shown):end])
            shown = text[:end]

    kwargs = generator._sampling(max_new_tokens, temperature, top_p, stop or None)
    if cancelled is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList([_Cancelled(cancelled)])
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=generator.device)  # (1, T)
    with torch.inference_mode():
        generator.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=_TokenSink(on_tokens),
                                 **kwargs)
    completion = generator._finish(tokens, len(prompt_ids), max_new_tokens, stop or None)
    if completion.text.startswith(shown) and len(completion.text) > len(shown):
        on_text(completion.text[len(shown):])  # whatever was held back at the end
    return completion


def context_length(generator: Generator) -> int | None:
    """The model's context window in tokens, when its config says."""
    return getattr(generator.model.config, "max_position_embeddings", None)


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _fit(generator: Generator, history: list[dict[str, str]], max_new_tokens: int) -> tuple[list[int], int]:
    """Prompt ids for the history, dropping the oldest turns until prompt + answer fit the context."""
    context = context_length(generator)
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
            completion = stream_answer(generator, ids, write_fn, max_new_tokens=cfg.max_new_tokens,
                                       temperature=cfg.temperature, top_p=cfg.top_p)
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
