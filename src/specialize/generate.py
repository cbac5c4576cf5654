"""Batched generation with a run's own template: KV cache, left padding, per-sequence EOS stop.

    specialize generate --model runs/faq "How do I reset my password?"

The prompt is rendered by the tokenizer's saved chat template with `add_generation_prompt=True`,
the same call plain transformers or vLLM make, so outputs match outside specialize.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from threading import Thread

import torch

from specialize.data.templates import Template, ours
from specialize.data.tokenize import pad_token_id
from specialize.model import load_model, load_tokenizer, pick_dtype


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int

    @property
    def stopped(self) -> bool:
        return self.finish_reason == "stop"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def template_of(tokenizer) -> Template:
    """The run's saved chat template; a base without one is prompted with our `qa` template."""
    if getattr(tokenizer, "chat_template", None):
        return Template(tokenizer.init_kwargs.get("specialize_template", "tokenizer"), tokenizer.chat_template)
    return ours("qa", tokenizer)


class Generator:
    """A loaded model + tokenizer + template, ready to answer batches of conversations."""

    def __init__(self, model, tokenizer, template: Template | None = None, device: torch.device | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template or template_of(tokenizer)
        self.device = device or next(model.parameters()).device
        self.pad_id = pad_token_id(tokenizer)

    @classmethod
    def load(cls, ref: str | Path, *, trust_remote_code: bool = False, device: torch.device | None = None,
             precision: str = "auto") -> "Generator":
        device = device or default_device()
        tokenizer = load_tokenizer(ref, trust_remote_code)
        model = load_model(ref, trust_remote_code=trust_remote_code, dtype=pick_dtype(precision, device))
        return cls(model.to(device), tokenizer, device=device)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.template.render(self.tokenizer, messages, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _sampling(self, max_new_tokens: int, temperature: float, top_p: float, stop: list[str] | None) -> dict:
        kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=self.tokenizer.eos_token_id,
                      pad_token_id=self.pad_id, use_cache=True)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if stop:
            kwargs.update(stop_strings=stop, tokenizer=self.tokenizer)
        return kwargs

    @torch.inference_mode()
    def generate(self, conversations: list[list[dict[str, str]]], *, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, stop: list[str] | None = None,
                 batch_size: int = 16, seed: int | None = None) -> list[Completion]:
        """Answer each conversation. Prompts of similar length are batched together."""
        if seed is not None:
            torch.manual_seed(seed)
        encoded = [self.prompt_ids(c) for c in conversations]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        results: list[Completion | None] = [None] * len(encoded)
        kwargs = self._sampling(max_new_tokens, temperature, top_p, stop)
        for start in range(0, len(order), batch_size):
            chunk = order[start: start + batch_size]
            width = max(len(encoded[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):  # left padding: every prompt ends where generation starts
                ids = encoded[i]
                input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                attention[row, width - len(ids):] = 1
            output = self.model.generate(input_ids=input_ids.to(self.device),
                                         attention_mask=attention.to(self.device), **kwargs)
            new_tokens = output[:, width:].tolist()
            for row, i in enumerate(chunk):
                results[i] = self._finish(new_tokens[row], len(encoded[i]), max_new_tokens, stop)
        return results  # type: ignore[return-value]

    def _finish(self, tokens: list[int], prompt_tokens: int, max_new_tokens: int,
                stop: list[str] | None) -> Completion:
        eos = self.tokenizer.eos_token_id
        finish = "length"
        while tokens and tokens[-1] == self.pad_id != eos:  # finished early in a batch: padded after
            tokens = tokens[:-1]
        if eos in tokens:
            tokens = tokens[: tokens.index(eos)]
            finish = "stop"
        elif len(tokens) < max_new_tokens:
            finish = "stop"  # ended early without EOS: a stop string matched
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for s in stop or []:
            if s in text:
                text, finish = text[: text.index(s)], "stop"
        return Completion(text, finish, prompt_tokens, len(tokens))

    def stream(self, messages: list[dict[str, str]], *, max_new_tokens: int = 128, temperature: float = 0.0,
               top_p: float = 1.0, stop: list[str] | None = None) -> Iterator[str]:
        """Yield the answer's text piece by piece as it is generated (one conversation)."""
        from transformers import TextIteratorStreamer

        ids = torch.tensor([self.prompt_ids(messages)], dtype=torch.long, device=self.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = self._sampling(max_new_tokens, temperature, top_p, stop)

        def run():
            with torch.inference_mode():
                self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer, **kwargs)

        thread = Thread(target=run, daemon=True)
        thread.start()
        yield from streamer
        thread.join()


def generate_answers(ref: str, prompts: list[str], *, max_new_tokens: int = 128, temperature: float = 0.0,
                     top_p: float = 1.0, batch_size: int = 16, system_prompt: str | None = None,
                     trust_remote_code: bool = False, seed: int = 0) -> list[Completion]:
    """Load a run (or any model) and answer plain-text prompts."""
    generator = Generator.load(ref, trust_remote_code=trust_remote_code)
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    conversations = [system + [{"role": "user", "content": p}] for p in prompts]
    return generator.generate(conversations, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              batch_size=batch_size, seed=seed)
