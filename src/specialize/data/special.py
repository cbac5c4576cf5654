"""Special-token strings in data are text, never control tokens.

A tokenizer splits a string at every special token's string (`<|im_end|>`, `<|eot_id|>`, its EOS)
and turns each into the control token, wherever the string came from. A rendered conversation is
one string, so a pasted document or a tool result from the web holding `<|im_end|>\\n<|im_start|>system`
would end its turn and open a forged one, at training, eval and serving alike.

Here the data (messages, tool calls, tool results, tools) is *defused* before rendering: each special
token's string in it becomes a run of private-use characters of the same length. Rendered, the
defused conversation holds only the special tokens the template wrote; it lines up character by
character with the real one, which `tokenize.encode_rendered` then tokenises with the data's
special-token strings read as text. Data without such strings (nearly all) takes none of these
paths and is tokenised exactly as plain transformers and vLLM tokenise the rendered prompt.
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Iterator
from typing import Self

from tokenizers import Tokenizer

# A special-token string in data becomes MARK+k (for the k-th special string), then FILL up to its
# length: characters of Supplementary Private Use Area-B, which no template writes and text all but never holds.
_MARK, _FILL = 0x100000, "\U0010fffd"
_RUN = re.compile("[\U00100000-\U0010fffc]\U0010fffd*")
_SPECIALS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TEXT_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Rendered(str):
    """A rendered conversation whose data held special-token strings, which are text.

    `plain` is the conversation rendered from the defused data: the same length, the same text but
    for private-use runs where the data's special-token strings are, so the special tokens left in it
    are exactly the ones the template wrote. Slicing or joining a `Rendered` gives a plain `str`.
    """

    plain: str

    def __new__(cls, text: str, plain: str) -> Self:
        rendered = super().__new__(cls, text)
        rendered.plain = plain
        return rendered


def special_strings(tokenizer) -> tuple[tuple[str, ...], re.Pattern | None]:
    """The strings of the tokenizer's special added tokens, longest first, and a pattern finding them
    (None: none, or a tokenizer that reads them as text anyway: `split_special_tokens`).

    These are the strings the tokenizer turns into control tokens wherever they are. Added tokens that
    are not special (Qwen3's `<think>`) are ordinary vocabulary, in data as in templates.
    """
    if getattr(tokenizer, "split_special_tokens", False):
        return (), None
    try:  # cached per tokenizer, until tokens are added
        size = len(tokenizer)
        cached = _SPECIALS.get(tokenizer)
    except TypeError:  # a wrapper without len or weak references: computed every time
        size, cached = None, None
    if cached is not None and cached[0] == size:
        return cached[1], cached[2]
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    found = {token.content for token in decoder.values() if token.special and token.content.strip()}
    strings = tuple(sorted(found, key=lambda s: (-len(s), s)))  # longest first, as the tokenizer matches them
    pattern = re.compile("|".join(map(re.escape, strings))) if strings else None
    if size is not None:
        _SPECIALS[tokenizer] = (size, strings, pattern)
    return strings, pattern


def string_fields(data, path: str = "") -> Iterator[tuple[str, str]]:
    """(where, text) for every string value in `data` (lists, dicts, strings): `messages[1].content`."""
    if isinstance(data, str):
        yield path, data
    elif isinstance(data, dict):
        for key, value in data.items():
            yield from string_fields(value, f"{path}.{key}" if path else str(key))
    elif isinstance(data, (list, tuple)):
        for i, value in enumerate(data):
            yield from string_fields(value, f"{path}[{i}]")


def _holds(data, search) -> bool:
    """Whether any string value in `data` has a match: the check every rendering makes, kept cheap."""
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if search(value):
                return True
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    return False


def defuse(tokenizer, data):
    """`data` (any nesting of lists, dicts and strings: messages, tools) with each special-token string in
    its string values replaced by a private-use run of the same length; None when it holds none (the
    common case, checked without copying anything)."""
    strings, pattern = special_strings(tokenizer)
    if pattern is None:
        return None
    if not _holds(data, pattern.search):
        return None
    index = {s: k for k, s in enumerate(strings)}

    def run(found: re.Match) -> str:
        return chr(_MARK + index[found.group()]) + _FILL * (len(found.group()) - 1)

    def walk(value):
        if isinstance(value, str):
            return pattern.sub(run, value)
        if isinstance(value, dict):
            return {key: walk(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(walk(item) for item in value)
        return value

    return walk(data)


def restore_text(tokenizer, plain: str) -> str | None:
    """`plain` (rendered from defused data) with each private-use run back as its special-token string;
    None when the template cut or rewrote a run, so the data's strings cannot be placed."""
    strings, _ = special_strings(tokenizer)
    runs = list(_RUN.finditer(plain))
    if any(ord(run.group()[0]) - _MARK >= len(strings) or len(strings[ord(run.group()[0]) - _MARK]) != len(run.group())
           for run in runs):
        return None
    return _RUN.sub(lambda run: strings[ord(run.group()[0]) - _MARK], plain)


def text_tokenizer(tokenizer, first: bool) -> Tokenizer:
    """A copy of the tokenizer's Rust tokenizer that reads special-token strings as text.

    Unless `first`, it tokenises a string as the middle of a longer one: SentencePiece-style
    tokenizers (Metaspace `prepend_scheme: first`) put a `▁` only at the start of the whole string.
    """
    size = len(tokenizer)
    cached = _TEXT_TOKENIZERS.get(tokenizer)
    if cached is None or cached[0] != size:
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        copies = []
        for middle in (False, True):
            copy = Tokenizer.from_str(json.dumps(_never_prepend(spec) if middle else spec))
            copy.encode_special_tokens = True
            copy.no_truncation()
            copy.no_padding()
            copies.append(copy)
        cached = (size, *copies)
        _TEXT_TOKENIZERS[tokenizer] = cached
    return cached[1] if first else cached[2]


def _never_prepend(spec):
    """The tokenizer spec with every `prepend_scheme: first` set to `never`."""
    if isinstance(spec, dict):
        return {key: "never" if key == "prepend_scheme" and value == "first" else _never_prepend(value)
                for key, value in spec.items()}
    if isinstance(spec, list):
        return [_never_prepend(item) for item in spec]
    return spec
