"""Constrained decoding: grammars that the server enforces token by token, with llguidance.

`response_format` (`json_object`, `json_schema`) and forced tool calls (`tool_choice` `required`
or a named function) become one llguidance grammar per request. Each request in the running
batch has its own `Constraint` (an `LLMatcher`, its parser state); before a row picks its next
token, every token the grammar does not allow gets -inf, so greedy, sampled and seeded answers
alike can only write what the grammar accepts. Once the grammar is complete only the model's
stop tokens are allowed, so the answer ends there.

Why llguidance (see the README for the comparison): a 3 MB wheel with no dependencies that
runs on CPU and computes masks in tens of microseconds, reads any Hugging Face fast tokenizer
(byte-level BPE, SentencePiece, added tokens), compiles JSON schema and Lark-like grammars,
is what OpenAI's own structured outputs, vLLM, SGLang and llama.cpp use, and masks are plain
tensors applied on whatever device the logits are on.

JSON is written the way `json.dumps` and Jinja's `tojson` write it (`", "`, `": "`, no other
whitespace): how a chat template renders tool-call arguments in training data, and an untrained
or unsure model cannot fill the budget with whitespace.
"""

from __future__ import annotations

import json
import threading

import torch

from specialize.serve.schema import APIError
from specialize.tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, function_of

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Any text without `<tool_call>` in it (tool_choice "none"): every string minus those containing it.
NO_TOOL_CALL = "start: TEXT\nTEXT: /(?s:.*)/ & ~/(?s:.*" + TOOL_CALL_OPEN + ".*)/\n"


def _lark_string(text: str) -> str:
    return json.dumps(text)  # a JSON string is a Lark string literal (\n and \" escapes)


def _json_rule(schema: dict) -> str:
    """`%json {...}` for `schema`, in our JSON style (the schema's own `x-guidance` options win)."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_STYLE | schema.get("x-guidance", {})})


def json_grammar(schema: dict | None) -> str:
    """A grammar for one JSON value matching `schema`; None: any JSON object (`json_object`)."""
    return "start: answer\nanswer: " + _json_rule(schema if schema is not None else {"type": "object"}) + "\n"


def tool_calls_grammar(tools: list[dict], name: str | None = None, parallel: bool = True) -> str:
    """A grammar for `<tool_call>` blocks as tools.render_tool_calls writes them, arguments matching each schema.

    Args:
        tools: the request's tools (checked already); `name` keeps only that function.
        parallel: several calls, one per block, separated by a newline; else exactly one.

    Each function's parameters are their own `%json` rule, so `$ref`s into their `$defs` still resolve.
    """
    functions = [function_of(t) for t in tools]
    if name is not None:
        functions = [f for f in functions if f["name"] == name]
    rules, names = [], []
    tail = _lark_string("}\n" + TOOL_CALL_CLOSE)
    for i, function in enumerate(functions):
        head = TOOL_CALL_OPEN + '\n{"name": ' + json.dumps(function["name"], ensure_ascii=False) + ', "arguments": '
        rules.append(f"call_{i}: {_lark_string(head)} args_{i} {tail}")
        rules.append(f"args_{i}: " + _json_rule(function.get("parameters") or {"type": "object"}))
        names.append(f"call_{i}")
    start = 'start: call ("\\n" call)*' if parallel else "start: call"
    return "\n".join([start, "call: " + " | ".join(names), *rules]) + "\n"


def json_or_tool_calls_grammar(schema: dict | None, tools: list[dict], parallel: bool) -> str:
    """`tool_choice: auto` with a JSON `response_format`: either the JSON answer or tool calls."""
    calls = tool_calls_grammar(tools, parallel=parallel).replace("start:", "calls:", 1)
    answer = "answer: " + _json_rule(schema if schema is not None else {"type": "object"})
    return "start: answer | calls\n" + answer + "\n" + calls


def _first_line(error: str) -> str:
    """llguidance's error without the grammar listing and position: "Invalid type: frobnicate"."""
    line = error.strip().splitlines()[0] if error.strip() else "invalid grammar"
    if line.startswith("panic:"):  # llguidance's own assertion, e.g. thousands of tools: not the client's text
        return "the grammar is too large"
    return line.split("failed to compile JSON schema: ")[-1]


class Constraint:
    """One request's grammar state: which tokens may come next, advanced by each token the row takes."""

    def __init__(self, matcher, stop_ids: list[int]):
        self.matcher, self.stop_ids = matcher, stop_ids

    def mask(self, vocab: int, device: torch.device) -> torch.Tensor:
        """(vocab,) bool, True where the token is allowed next; on `device`, next to the logits."""
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32).to(device)  # (V/32,)
        bits = (words[:, None] >> torch.arange(32, dtype=torch.int32, device=device)) & 1  # (V/32, 32)
        allowed = bits.flatten()[:vocab].bool()
        if allowed.shape[0] < vocab:  # logits wider than the tokenizer (padded embeddings): never allowed
            allowed = torch.cat([allowed, allowed.new_zeros(vocab - allowed.shape[0])])
        if not allowed.any():  # a matcher in an error state allows nothing: end the answer rather than fail
            allowed[self.stop_ids] = True
        return allowed

    def take(self, token: int) -> None:
        if token not in self.stop_ids:
            self.matcher.consume_token(token)


class Grammars:
    """Compiles request grammars against the served tokenizer (built once, on first use: ~1 s for 150k tokens)."""

    def __init__(self, generator):
        self.generator = generator
        self._tokenizer = None
        self._lock = threading.Lock()

    @property
    def vocab(self) -> int:
        """The width of the model's logits."""
        embeddings = self.generator.model.get_output_embeddings()
        width = embeddings.weight.shape[0] if embeddings is not None else self.generator.model.config.vocab_size
        return max(width, len(self.generator.tokenizer))

    def tokenizer(self):
        """The llguidance view of the served tokenizer; APIError 400 when it cannot have one."""
        with self._lock:
            if self._tokenizer is None:
                try:
                    import llguidance.hf
                except ImportError:
                    raise APIError(400, "constrained decoding and logprobs need llguidance on the server "
                                        "(pip install llguidance)", code="unsupported") from None
                try:
                    self._tokenizer = llguidance.hf.from_tokenizer(self.generator.tokenizer, n_vocab=self.vocab,
                                                                   eos_token=list(self.generator.stop_ids))
                except Exception as e:  # a slow (Python) tokenizer: llguidance reads fast ones only
                    raise APIError(400, f"this model's tokenizer cannot be used for constrained decoding: {e}",
                                   code="unsupported") from None
            return self._tokenizer

    def constraint(self, grammar: str, param: str) -> Constraint:
        """A fresh matcher for `grammar`; a grammar llguidance refuses (a bad schema) is a 400 naming `param`."""
        from llguidance import LLMatcher

        tokenizer = self.tokenizer()
        matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise APIError(400, f"{param}: cannot be enforced: {_first_line(matcher.get_error())}", param=param,
                           code="invalid_schema")
        return Constraint(matcher, list(self.generator.stop_ids))

    def token_bytes(self, token: int) -> bytes:
        """The exact bytes of one token, for logprobs: part of a character for byte-level BPE, a space for
        SentencePiece's ▁, the token's own text for special tokens."""
        try:
            return self.tokenizer().decode_bytes([token])
        except APIError:  # no llguidance, or a slow tokenizer: the decoded text is the best there is
            return self.generator.tokenizer.decode([token]).encode()
