"""Special-token strings in data are text, never control tokens.

A tokenizer splits a string at every special token's string (`<|im_end|>`, `<|eot_id|>`, its EOS)
and turns each into the control token, wherever the string came from. A rendered conversation is
one string, so a pasted document or a tool result from the web holding `<|im_end|>\\n<|im_start|>system`
would end its turn and open a forged one, at training, eval and serving alike.

Here the data (messages, tool calls, tool results, tools, dict keys included) is *defused* before rendering,
exactly as the template reads it (`templates.Template.prepare`: arguments decoded from JSON, content parts
joined, a run's default system message in front): each special token's string in it becomes a run of
private-use characters of the same length, characters the row does not hold. Rendered, the
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

from tokenizers import Tokenizer

from specialize.errors import UserError

# A special-token string in data becomes a mark (one per distinct string in the row), then FILL up to its
# length. Marks and FILL are characters of Supplementary Private Use Area-B that the row and the template do not
# hold (`_free`), so no text in the data can pass for a defused string, nor be restored as one.
_PRIVATE = (0x100000, 0x10FFFD)
_IN_PRIVATE = re.compile("[\U00100000-\U0010fffd]")
_SPECIALS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TEXT_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Rendered(str):
    """A rendered conversation whose data held special-token strings, which are text.

    `plain` is the conversation rendered from the defused data: the same length, the same text but
    for private-use runs where the data's special-token strings are, so the special tokens left in it
    are exactly the ones the template wrote. Slicing or joining a `Rendered` gives a plain `str`.
    """

    plain: str

    def __new__(cls, text: str, plain: str) -> Rendered:  # noqa: PYI034 (typing.Self: Python 3.11+)
        rendered = super().__new__(cls, text)
        rendered.plain = plain
        return rendered

    def __reduce__(self):  # copy, deepcopy and pickle (a DataLoader worker) keep `plain`
        return Rendered, (str(self), self.plain)


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
    pattern = re.compile(_trie(strings)) if strings else None
    if size is not None:
        _SPECIALS[tokenizer] = (size, strings, pattern)
    return strings, pattern


def _trie(strings) -> str:
    """A regex matching any of `strings`, the longest where several start at one place (as the tokenizer
    matches them), written as a trie: an alternation of thousands of strings (Gemma's `<unusedN>`) is
    tried string by string at every `<` of a long row; the trie reads each character once."""
    root: dict = {}
    for string in strings:
        node = root
        for ch in string:
            node = node.setdefault(ch, {})
        node[""] = {}

    def pattern(node: dict) -> str:
        branches = [re.escape(ch) + pattern(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body  # greedy: the longer string first

    return pattern(root)


def string_fields(data, path: str = "") -> Iterator[tuple[str, str]]:
    """(where, text) for every string in `data` (lists, dicts, strings), dict keys included (a tool schema's
    property names, an arguments object's keys are rendered too): `messages[1].content`, `tools[0]...properties`
    for a key of `properties`."""
    if isinstance(data, str):
        yield path, data
    elif isinstance(data, dict):
        for key, value in data.items():
            if isinstance(key, str):
                yield f"{path} (key)" if path else "(key)", key
            yield from string_fields(value, f"{path}.{key}" if path else str(key))
    elif isinstance(data, (list, tuple)):
        for i, value in enumerate(data):
            yield from string_fields(value, f"{path}[{i}]")


def _holds(data, search) -> bool:
    """Whether any string in `data` (values and dict keys) has a match: the check every rendering makes,
    kept cheap."""
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if search(value):
                return True
        elif isinstance(value, dict):
            stack.extend(value.values())
            stack.extend(value.keys())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    return False


class Defused:
    """Data with its special-token strings replaced by private-use runs of the same length (`defuse`), and
    how to put them back into text rendered from it (`restore`)."""

    def __init__(self, data, marks: dict[str, str], fill: str):
        self.data = data
        self._strings = {mark: string for string, mark in marks.items()}
        self._run = re.compile("[" + "".join(self._strings) + "]" + re.escape(fill) + "*")
        self._any = re.compile("[" + "".join(self._strings) + re.escape(fill) + "]")

    def restore(self, plain: str) -> str | None:
        """`plain` (rendered from `data`) with each run back as its special-token string; None when the
        template cut or rewrote a run, so the data's strings cannot be placed."""
        runs = list(self._run.finditer(plain))
        if any(len(self._strings[run.group()[0]]) != len(run.group()) for run in runs) or \
                sum(len(run.group()) for run in runs) != len(self._any.findall(plain)):
            return None
        return self._run.sub(lambda run: self._strings[run.group()[0]], plain)


def _free(data, avoid: str, count: int) -> list[str]:
    """`count` private-use characters that neither `data` nor `avoid` (the template) holds."""
    used = set(_IN_PRIVATE.findall(avoid))
    for _, text in string_fields(data):
        if _IN_PRIVATE.search(text):
            used.update(_IN_PRIVATE.findall(text))
    free = (chr(c) for c in range(_PRIVATE[0], _PRIVATE[1] + 1) if chr(c) not in used)
    chosen = [ch for _, ch in zip(range(count), free)]
    if len(chosen) < count:  # 65,534 code points: only a row built to hold them all
        raise UserError("a row holds nearly every character of Supplementary Private Use Area-B and special-token "
                        "strings: its special-token strings cannot be kept as text")
    return chosen


def defuse(tokenizer, data, avoid: str = "") -> Defused | None:
    """`data` (any nesting of lists, dicts and strings: messages, tools) with each special-token string in
    its strings (dict keys too) replaced by a private-use run of the same length; None when it holds none
    (the common case, checked without copying anything). `avoid`: text whose private-use characters the
    runs must not use (the template)."""
    _, pattern = special_strings(tokenizer)
    if pattern is None or not _holds(data, pattern.search):
        return None
    found = sorted({s for _, text in string_fields(data) for s in pattern.findall(text)})
    fill, *marks = _free(data, avoid, len(found) + 1)
    mark_of = dict(zip(found, marks))

    def run(match: re.Match) -> str:
        return mark_of[match.group()] + fill * (len(match.group()) - 1)

    def walk(value):
        if isinstance(value, str):
            return pattern.sub(run, value)
        if isinstance(value, dict):
            return {walk(key): walk(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(walk(item) for item in value)
        return value

    return Defused(walk(data), mark_of, fill)


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
