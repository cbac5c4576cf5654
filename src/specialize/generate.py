"""Generation with a run's own template: KV cache, left padding, per-sequence stop, streaming.

    specialize generate --model runs/faq "How do I reset my password?"

The prompt is rendered by the tokenizer's saved chat template with `add_generation_prompt=True`,
the same call plain transformers or vLLM make, so outputs match outside specialize. A special
token's string inside the messages (a tool result holding `<|im_end|>`) is tokenised as text, as
training tokenises it (`tokenize.encode_rendered`), so data can never forge a turn.

`Generator` is what every later stage uses: `generate` answers conversations (render, tokenise,
batch by length), `generate_ids` answers one batch of already-tokenised prompts (what the
server's batching worker calls), and `stream_ids` answers one prompt piece by piece in the
calling thread (chat and streamed server responses). All three finish answers the same way, so
a streamed or served answer is the `generate` answer for the same prompt and settings.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from specialize.data.templates import Template, ours
from specialize.data.tokenize import encode_rendered, pad_token_id
from specialize.errors import UserError
from specialize.model import context_length, load_model, load_tokenizer, pick_dtype, stop_token_ids
from specialize.stopping import Cancelled, StopStrings, safe_end


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (a stop token or string), "length", or "cancelled" (stream_ids only)
    prompt_tokens: int
    completion_tokens: int
    # The server's `logprobs`: per answer token (token id, log-probability, [(id, log-probability)] of the
    # most likely tokens), from the model's own distribution; None when not asked for.
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None
    # The token ids as sampled: the answer's, then the stop token that ended it when one did (what GRPO
    # trains on; re-tokenising `text` gives other ids). None when a stop string cut the text, or when
    # the answer did not come from this module's generator. Not compared: equal answers are equal.
    ids: list[int] | None = field(default=None, compare=False)

    @property
    def stopped(self) -> bool:
        return self.finish_reason == "stop"


# Below this temperature, sampling is greedy: at 1e-5 the most likely token already wins all but
# exact ties, and far smaller ones (1e-300) overflow the logits to inf, whose softmax is nan: a
# RuntimeError on CPU and a device-side assert on CUDA that leaves the GPU unusable.
GREEDY_BELOW = 1e-5
SEED_SPACE = 2**64  # torch seeds are 64-bit; -1 and 2**64 - 1 are the same seed to torch


def default_device() -> torch.device:
    """CUDA, then Apple's MPS, then CPU: the order training (accelerate) picks devices in."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def is_greedy(temperature: float | None) -> bool:
    """Whether `temperature` means greedy decoding: 0, None, or too small to sample safely."""
    return not temperature or temperature < GREEDY_BELOW


def seed_sampling(seed: int) -> None:
    """Seed torch (every device) for sampling; any int works: beyond 64 bits it wraps around instead of raising."""
    torch.manual_seed(seed % SEED_SPACE)


def template_of(tokenizer) -> Template:
    """The run's saved chat template; a base without one is prompted with our `qa` template."""
    if getattr(tokenizer, "chat_template", None):
        return Template(tokenizer.init_kwargs.get("specialize_template", "tokenizer"), tokenizer.chat_template)
    return ours("qa", tokenizer)


def _stops(stop: list[str] | None) -> list[str]:
    return [s for s in stop or [] if s]  # an empty stop string would end every answer at once


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


_REASONING = re.compile(r"\A\s*<think>(.*?)</think>\s*", re.S)


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, answer): a leading `<think>…</think>` block, as Qwen3 and DeepSeek-R1 style
    templates train the model to write before its answer, split off the answer (None if absent).

    Scoring an answer against a reference must not count the reasoning (Qwen3 writes an empty
    `<think>\n\n</think>\n\n` before every final answer).
    """
    found = _REASONING.match(text)
    if found is None:
        return None, text
    return found.group(1).strip(), text[found.end():]


class ContextOverflow(ValueError):
    """A prompt plus its answer budget does not fit the model's context window.

    Past the window, models with learned positions (GPT-2, OPT) index out of their position table:
    an IndexError on CPU, and on CUDA a device-side assert that breaks every later call.
    """

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context: int, index: int | None = None):
        super().__init__(f"the prompt ({prompt_tokens} tokens) plus max_new_tokens ({max_new_tokens}) exceeds "
                         f"the model's context of {context} tokens")
        self.prompt_tokens, self.max_new_tokens, self.context = prompt_tokens, max_new_tokens, context
        self.index = index  # which of `generate`'s conversations, when it was one of them


class Generator:
    """A loaded model + tokenizer + template, ready to answer batches of conversations."""

    def __init__(self, model, tokenizer, template: Template | None = None, device: torch.device | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template or template_of(tokenizer)
        self.device = device or next(model.parameters()).device
        self.pad_id = pad_token_id(tokenizer)
        self.stop_ids = stop_token_ids(model, tokenizer)  # tokenizer EOS first, then generation_config's

    @classmethod
    def load(cls, ref: str | Path, *, trust_remote_code: bool = False, device: torch.device | None = None,
             precision: str = "auto") -> "Generator":
        device = device or default_device()
        tokenizer = load_tokenizer(ref, trust_remote_code)
        model = load_model(ref, trust_remote_code=trust_remote_code, dtype=pick_dtype(precision, device))
        return cls(model.to(device), tokenizer, device=device)

    @property
    def context_length(self) -> int | None:
        """The model's context window in tokens, when its config says."""
        return context_length(self.model.config)

    def check_fits(self, prompt_tokens: int, max_new_tokens: int, index: int | None = None) -> None:
        """Raise `ContextOverflow` unless `prompt_tokens + max_new_tokens` fit the context window."""
        context = self.context_length
        if context is not None and prompt_tokens + max_new_tokens > context:
            raise ContextOverflow(prompt_tokens, max_new_tokens, context, index)

    def prompt_text(self, messages: list[dict[str, str]]) -> str:
        """The conversation rendered by the run's template, ready for the answer."""
        return self.template.render(self.tokenizer, messages, add_generation_prompt=True)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The conversation rendered by the run's template, ready for the answer, as token ids."""
        return self.text_ids(self.prompt_text(messages))

    def text_ids(self, text: str) -> list[int]:
        """Token ids of an already rendered prompt (the template put in any special tokens). When `text`
        is `Template.render`'s, special-token strings from the messages are text (`encode_rendered`)."""
        return encode_rendered(self.tokenizer, text)

    def generate(self, conversations: list[list[dict[str, str]]], *, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, stop: list[str] | None = None,
                 batch_size: int = 16, seed: int | None = None, fit_context: bool = False,
                 on_batch: Callable[[int, int], None] | None = None) -> list[Completion]:
        """Answer each conversation, in its order. Prompts of similar length are batched together.

        Args:
            seed: seeds sampling once, before the first batch (greedy ignores it).
            fit_context: shorten `max_new_tokens` to the room the context leaves after the prompt
                (the answer then ends with finish_reason "length"), instead of raising; for default
                budgets on short-context models. A prompt that fills the context still raises.
            on_batch: called as `on_batch(done, total)` after each batch, for progress bars.

        Raises:
            ContextOverflow: before anything is generated, naming the first conversation (`index`)
                whose prompt plus `max_new_tokens` does not fit the context window.
        """
        if seed is not None:
            seed_sampling(seed)
        encoded = [self.prompt_ids(c) for c in conversations]
        context = self.context_length
        for i, ids in enumerate(encoded):  # all checked first: no hour of answers lost to the last prompt
            self.check_fits(len(ids), 1 if fit_context else max_new_tokens, index=i)
        # Sorting by length keeps padding (wasted compute) small; answers go back in input order.
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        results: list[Completion | None] = [None] * len(encoded)
        for start in range(0, len(order), batch_size):
            chunk = order[start: start + batch_size]
            budget = max_new_tokens
            if fit_context and context is not None:  # the batch is as wide as its longest prompt
                budget = min(max_new_tokens, context - max(len(encoded[i]) for i in chunk))
            done = self.generate_ids([encoded[i] for i in chunk], max_new_tokens=budget,
                                     temperature=temperature, top_p=top_p, stop=stop)
            for i, completion in zip(chunk, done):
                results[i] = completion
            if on_batch is not None:
                on_batch(start + len(chunk), len(order))
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def generate_ids(self, prompts: list[list[int]], *, max_new_tokens: int | list[int], temperature: float = 0.0,
                     top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None,
                     cancelled: list[Callable[[], bool]] | None = None) -> list[Completion]:
        """Answer one batch of already-tokenised prompts together.

        Args:
            prompts: token ids of each prompt (e.g. from `prompt_ids`), any lengths; left-padded here.
            max_new_tokens: one budget for all, or one per prompt. The batch runs to the largest
                budget and each answer is cut to its own, so an answer never depends on its neighbours'.
            stop: strings that end an answer (not included in it); finish_reason is then "stop".
            seed: seeds sampling before this batch (greedy ignores it).
            cancelled: one flag per prompt, checked after every token; a row whose flag is true
                stops (finish_reason "cancelled") while the others go on unchanged.

        Raises:
            ContextOverflow: the batch is as wide as its longest prompt and runs to its largest
                budget, so that sum must fit the context, even when each prompt fits alone.
        """
        budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(budgets) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(budgets)} max_new_tokens")
        if any(not ids for ids in prompts):
            raise ValueError("empty prompt: nothing to answer")
        if cancelled is not None and len(cancelled) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(cancelled)} cancel flags")
        if not prompts:
            return []
        width = max(len(ids) for ids in prompts)
        self.check_fits(width, max(budgets))
        stop = _stops(stop)
        if seed is not None:
            seed_sampling(seed)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)  # (B, T)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, T)
        for row, ids in enumerate(prompts):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention[row, width - len(ids):] = 1
        kwargs = self._sampling(max(budgets), temperature, top_p)
        ended: list[int | None] = [None] * len(prompts)  # new tokens when a stop string or cancel ended the row
        kwargs["stopping_criteria"] = self._criteria(width, stop, cancelled, ended)
        output = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                                     **kwargs)
        new_tokens = output[:, width:].tolist()  # (B, new)
        # A row that ended early is padded after; the pad id is not told apart from a sampled one (a model
        # may sample its pad token), so each row is cut where it ended, never at trailing pad ids.
        return [self._finish(new_tokens[row][:budget if end is None else min(end, budget)], len(ids), budget, stop,
                             cancelled=cancelled is not None and bool(cancelled[row]()))
                for row, (ids, budget, end) in enumerate(zip(prompts, budgets, ended))]

    @torch.inference_mode()
    def stream_ids(self, prompt_ids: list[int], *, max_new_tokens: int = 128, temperature: float = 0.0,
                   top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None,
                   on_text: Callable[[str], None] | None = None,
                   cancelled: Callable[[], bool] | None = None) -> Completion:
        """Answer one prompt in this thread, calling `on_text(piece)` as soon as each piece is final.

        Generation runs in the calling thread, so an exception from `on_text` (Ctrl-C in chat) stops
        it at once. A piece is handed out only once no stop string can begin in it, so the pieces
        joined are exactly `Completion.text`, which equals `generate_ids` for the same prompt and
        settings.

        Args:
            cancelled: checked after every token; once it returns True generation stops and
                finish_reason is "cancelled" (unless the answer had ended anyway).

        Raises:
            ContextOverflow: the prompt plus `max_new_tokens` does not fit the context window.
        """
        if not prompt_ids:
            raise ValueError("empty prompt: nothing to answer")
        self.check_fits(len(prompt_ids), max_new_tokens)
        stop = _stops(stop)
        tokens: list[int] = []
        shown = ""

        def on_tokens(new: list[int]) -> None:
            nonlocal shown
            tokens.extend(new)
            if on_text is None:
                return
            visible = tokens[: self._first_stop(tokens)]
            # Decoding the whole answer each step (not token by token) keeps multi-token characters
            # and tokenizers that merge spaces right; answers are short, so the cost is small.
            text = self.tokenizer.decode(visible, skip_special_tokens=True)
            end = safe_end(text, stop)
            if end > len(shown) and text.startswith(shown):
                on_text(text[len(shown):end])
                shown = text[:end]

        if seed is not None:
            seed_sampling(seed)
        kwargs = self._sampling(max_new_tokens, temperature, top_p)
        kwargs["stopping_criteria"] = self._criteria(len(prompt_ids), stop, None if cancelled is None else [cancelled],
                                                     [None])
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)  # (1, T)
        self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=_TokenSink(on_tokens),
                            **kwargs)
        completion = self._finish(tokens, len(prompt_ids), max_new_tokens, stop,
                                  cancelled=cancelled is not None and bool(cancelled()))
        if on_text is not None and completion.text.startswith(shown) and len(completion.text) > len(shown):
            on_text(completion.text[len(shown):])  # whatever was held back at the end
        return completion

    def _criteria(self, width: int, stop: list[str], cancelled: list[Callable[[], bool]] | None,
                  ended: list[int | None]) -> StoppingCriteriaList:
        def visible(row: list[int]) -> str:  # the answer's text so far, up to its first stop token
            return self.tokenizer.decode(row[: self._first_stop(row)], skip_special_tokens=True)

        return StoppingCriteriaList(([StopStrings(visible, width, stop, ended)] if stop else [])
                                    + ([Cancelled(cancelled, width, ended)] if cancelled is not None else []))

    def _sampling(self, max_new_tokens: int, temperature: float, top_p: float) -> dict:
        """`model.generate` arguments: greedy at temperature 0 (or below `GREEDY_BELOW`), else nucleus sampling."""
        kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
                      use_cache=True)
        if not is_greedy(temperature):
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    def _finish(self, tokens: list[int], prompt_tokens: int, max_new_tokens: int, stop: list[str],
                cancelled: bool = False) -> Completion:
        """The answer in `tokens` (the new tokens as sampled, no padding after): cut at the first stop token
        or string, with why it ended."""
        finish = "length"
        end = self._first_stop(tokens)
        sampled = list(tokens[: end + 1])
        if end < len(tokens):
            tokens = tokens[:end]
            finish = "stop"
        elif len(tokens) < max_new_tokens:
            finish = "cancelled" if cancelled else "stop"  # ended early without a stop token: a stop string matched
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for s in stop:
            if s in text:
                text, finish, sampled = text[: text.index(s)], "stop", None
        return Completion(text, finish, prompt_tokens, len(tokens), ids=sampled)

    def _first_stop(self, tokens: list[int]) -> int:
        """The index of the first stop token in `tokens`, or len(tokens) when there is none."""
        return next((i for i, t in enumerate(tokens) if t in self.stop_ids), len(tokens))


def generate_answers(ref: str, prompts: list[str], *, max_new_tokens: int = 128, temperature: float = 0.0,
                     top_p: float = 1.0, batch_size: int = 16, system_prompt: str | None = None,
                     trust_remote_code: bool = False, seed: int = 0) -> list[Completion]:
    """Load a run (or any model) and answer plain-text prompts."""
    generator = Generator.load(ref, trust_remote_code=trust_remote_code)
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    conversations = [system + [{"role": "user", "content": p}] for p in prompts]
    try:
        return generator.generate(conversations, max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_p=top_p, batch_size=batch_size, seed=seed, fit_context=True)
    except ContextOverflow as e:  # the prompt alone fills the context
        raise UserError(f"prompt {e.index + 1}: {e}") from None
