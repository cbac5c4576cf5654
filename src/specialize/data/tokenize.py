"""Examples → token ids and labels, and micro-batches (padded or packed).

The rules every fine-tuning bug report is about, pinned by tests:
- a conversation is tokenised as one string, as inference tokenises its prompt, and labelled by
  character spans (see `encode_chat`);
- prompt tokens get label -100 (unless `train_on_prompt`), answer tokens and EOS are trained;
- padding is masked *by position* (attention mask and labels), never by token id, so EOS is
  still trained when the tokenizer pads with its EOS token;
- an example longer than `max_seq_tokens` is dropped and counted, never cut;
- the first token of every example is never a target, packed or not, so a packed row never
  predicts one example from another;
- text in the data is text: a special token's string inside a message, tool call, tool result or
  raw text is tokenised as the plain text it is, never as the control token (`encode_rendered`).
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections import Counter
from dataclasses import dataclass, field
from itertools import accumulate

import torch

from specialize.data.formats import Example
from specialize.data.special import special_strings, text_tokenizer
from specialize.data.templates import Template, segments
from specialize.errors import UserError

IGNORE = -100


@dataclass
class Encoded:
    """One tokenised example. `labels[i]` is the label of token i (not yet shifted)."""

    input_ids: list[int]
    labels: list[int]
    source: str = ""

    @property
    def target_tokens(self) -> int:
        return sum(1 for label in self.labels[1:] if label != IGNORE)


@dataclass
class EncodeReport:
    """What happened to the examples: kept, and dropped with reasons."""

    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    first_dropped: dict[str, str] = field(default_factory=dict)
    unit: str = "example"  # what is counted: examples, or preference rows

    def drop(self, reason: str, source: str) -> None:
        self.dropped[reason] += 1
        self.first_dropped.setdefault(reason, source)

    def lines(self) -> list[str]:
        return [f"dropped {n} {self.unit}(s): {reason} (first: {self.first_dropped[reason]})"
                for reason, n in self.dropped.items()]


def _ids(tokenizer, text: str, as_text: bool = False) -> list[int]:
    """The ids of `text`; `as_text`: special-token strings in it are read as text."""
    if as_text:
        return _text_ids(tokenizer, text)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _text_ids(tokenizer, text: str) -> list[int]:
    """The ids of `text` with its special-token strings read as text; added tokens that are not special
    (Qwen3's `<think>`) stay the tokens they are, as in any text.

    A fast tokenizer does exactly that with `split_special_tokens` (here: `special.text_tokenizer`). A slow (Python) one given that flag
    splits at no added token at all, so there: text without special-token strings (nearly all) is tokenised
    as is, and text with them is cut where the other added tokens are (as the slow tokenizer cuts), each
    piece between them tokenised whole with `split_special_tokens`.
    """
    if getattr(tokenizer, "is_fast", False):
        # The text-reading copy, not `tokenizer(..., split_special_tokens=True)`: transformers sets that flag
        # on the shared Rust tokenizer, where a serving thread tokenising a prompt at the same moment
        # would read its template's control tokens as text.
        return text_tokenizer(tokenizer, first=True).encode(text, add_special_tokens=False).ids
    _, special = special_strings(tokenizer)
    if special is None or not special.search(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    added = sorted({t.content for t in decoder.values() if not t.special and t.content}, key=lambda s: (-len(s), s))
    ids: list[int] = []
    done = 0
    for found in re.finditer("|".join(map(re.escape, added)), text) if added else ():
        if found.start() > done:
            ids += tokenizer(text[done:found.start()], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        ids.append(tokenizer.convert_tokens_to_ids(found.group()))
        done = found.end()
    if done < len(text):
        ids += tokenizer(text[done:], add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids


def encode_rendered(tokenizer, text: str) -> list[int]:
    """The ids of a rendered prompt (`Template.render`): the special tokens the template wrote are control
    tokens; special-token strings that came from the data (a `templates.Rendered`) are text.

    Without such strings this is exactly `tokenizer(text, add_special_tokens=False)`, as plain
    transformers and vLLM tokenise a rendered prompt.
    """
    plain = getattr(text, "plain", None)
    if plain is None:
        return _ids(tokenizer, text)
    if not getattr(tokenizer, "is_fast", False):
        return _ids_without_offsets(tokenizer, str(text), plain)
    return _spans(tokenizer, str(text), plain=plain)[0]


def encode_chat(example: Example, tokenizer, template: Template, train_on_prompt: bool = False) -> Encoded:
    """Tokenise a conversation as one string, as inference tokenises a prompt, and train its answers.

    `templates.segments` splits the rendered conversation into prompt and answer pieces; an
    answer piece is the assistant's text plus the EOS / end of turn the template renders after
    it. The whole text is tokenised at once: tokenising the pieces one by one gives the same ids
    for byte-level BPE (GPT-2, Llama-3, Qwen) but for merges across pieces, and not for
    SentencePiece-style tokenizers (Llama-2, Mistral, Gemma), which put a `▁` at the start of
    every string they tokenise.

    Labels come from character offsets (see `_spans` for where a token begins). Boundary rules:
    - a token is trained when it begins inside an answer piece, so one across the end of an
      answer (into the next prompt) is trained;
    - where an answer starts, an inference prompt ends: if a token crosses that point (a merge,
      e.g. " Thanks" after a prompt ending in a space), the text is cut there and the rest is
      tokenised as a continuation, so training sees exactly the inference prompt's tokens. Later
      prompts rendered whole then hold the merge that training cut: no single sequence can match
      both, and lint reports it as `template_roundtrip`.

    Tokenizers without offsets (slow ones) are tokenised piece by piece instead.
    """
    pieces = segments(template, tokenizer, example.messages, example.tools)
    if not getattr(tokenizer, "is_fast", False):
        return _encode_pieces(pieces, tokenizer, train_on_prompt, example.source)
    text = "".join(piece for piece, _ in pieces)
    # Data holding special-token strings: `plain` shows which special tokens the template wrote (see encode_rendered)
    plain = "".join(getattr(piece, "plain", piece) for piece, _ in pieces) if any(
        hasattr(piece, "plain") for piece, _ in pieces) else None
    piece_starts = list(accumulate((len(piece) for piece, _ in pieces[:-1]), initial=0))  # chars
    input_ids, spans = _spans(tokenizer, text, plain=plain)
    cuts = [start for start, (_, trained) in zip(piece_starts, pieces)
            if trained and start > 0 and _crossed(spans, start)]
    if cuts:
        input_ids, spans = [], []
        for lo, hi in zip([0, *cuts], [*cuts, len(text)]):
            ids, chunk_spans = _spans(tokenizer, text[lo:hi], continuation=lo > 0,
                                      plain=None if plain is None else plain[lo:hi])
            input_ids += ids
            spans += [(begin + lo, end + lo) for begin, end in chunk_spans]
    labels = []
    for token, (begin, _) in zip(input_ids, spans):
        trained = pieces[bisect_right(piece_starts, begin) - 1][1]
        labels.append(token if (trained or train_on_prompt) else IGNORE)
    if labels:
        labels[0] = IGNORE  # nothing predicts the first token
    return Encoded(input_ids, labels, example.source)


def _spans(tokenizer, text: str, continuation: bool = False,
           plain: str | None = None) -> tuple[list[int], list[tuple[int, int]]]:
    """The ids of `text` and the [begin, end) characters of each token.

    A token begins where the previous one ended, or earlier if its own offsets say so: byte-level
    post-processors trim a leading space off the offsets, and the byte tokens of one character
    share its offsets. `continuation` tokenises the text as it reads after a cut rather than as
    the start of a string (where SentencePiece puts a `▁`): after the EOS token, then dropped.
    `plain`: `text` with the special-token strings of its data defused (`templates.Rendered.plain`).
    """
    ids, offsets = _offsets(tokenizer, text, continuation) if plain is None else \
        _offsets_as_text(tokenizer, text, plain, continuation)
    spans, previous_end = [], 0
    for start, end in offsets:
        spans.append((min(start, previous_end), end))
        previous_end = end
    return ids, spans


def _offsets(tokenizer, text: str, continuation: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
    """The ids of `text` and each token's (start, end) characters, as the tokenizer reports them."""
    anchor = tokenizer.eos_token if continuation and tokenizer.eos_token else ""
    encoding = tokenizer(anchor + text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], [tuple(offset) for offset in encoding["offset_mapping"]]
    if anchor:
        if ids[:1] != [tokenizer.eos_token_id] or offsets[0] != (0, len(anchor)):
            return _offsets(tokenizer, text)  # EOS is read as plain text (split_special_tokens): no anchor
        ids, offsets = ids[1:], [(start - len(anchor), end - len(anchor)) for start, end in offsets[1:]]
    return ids, offsets


def _offsets_as_text(tokenizer, text: str, plain: str,
                     continuation: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """`_offsets` of `text`, where only the special tokens that `plain` still holds (the template's) are
    control tokens: the text between two of them is tokenised with special-token strings read as text.

    The tokenizer splits a string at its added tokens first and tokenises each piece between them
    alone, so cutting at the template's special tokens gives the ids the whole string gets wherever no
    data holds a special-token string. A piece not at the start of the string is tokenised as one
    (no SentencePiece `▁` in front), as it is inside the whole string.
    """
    ids, offsets = _offsets(tokenizer, plain, continuation)  # the template's special tokens, where they are
    strings = special_strings(tokenizer)[0]
    special = dict(zip(tokenizer.convert_tokens_to_ids(list(strings)), strings))
    out_ids: list[int] = []
    out_offsets: list[tuple[int, int]] = []
    done = 0

    def between(lo: int, hi: int) -> None:
        encoding = text_tokenizer(tokenizer, first=lo == 0 and not continuation).encode(
            text[lo:hi], add_special_tokens=False)
        out_ids.extend(encoding.ids)
        out_offsets.extend((start + lo, end + lo) for start, end in encoding.offsets)

    for token, (start, end) in zip(ids, offsets):
        if token in special and special[token] in plain[start:end]:  # not an unknown-character token, say
            if start > done:
                between(done, start)
            out_ids.append(token)
            out_offsets.append((start, end))
            done = max(done, end)
    if done < len(text):
        between(done, len(text))
    return out_ids, out_offsets


def _crossed(spans: list[tuple[int, int]], char: int) -> bool:
    """True when one token covers characters on both sides of position `char`."""
    after = bisect_left(spans, (char,))  # the first token beginning at or after `char`
    return after > 0 and spans[after - 1][1] > char


def _encode_pieces(pieces: list[tuple[str, bool]], tokenizer, train_on_prompt: bool, source: str) -> Encoded:
    """The fallback without offsets: each piece tokenised alone (exact for byte-level BPE only)."""
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained in pieces:
        ids = encode_rendered(tokenizer, text)
        input_ids.extend(ids)
        labels.extend(ids if (trained or train_on_prompt) else [IGNORE] * len(ids))
    if labels:
        labels[0] = IGNORE  # nothing predicts the first token
    return Encoded(input_ids, labels, source)


def _ids_without_offsets(tokenizer, text: str, plain: str) -> list[int]:
    """`encode_rendered` for tokenizers without offsets: cut at the special-token strings `plain` still
    holds (the template's), each piece between them read as text."""
    _, pattern = special_strings(tokenizer)
    ids: list[int] = []
    done = 0
    for found in pattern.finditer(plain):
        ids += _ids(tokenizer, text[done:found.start()], as_text=True) if found.start() > done else []
        ids.append(tokenizer.convert_tokens_to_ids(found.group()))
        done = found.end()
    return ids + (_ids(tokenizer, text[done:], as_text=True) if done < len(text) else [])


def encode_text(example: Example, tokenizer, max_seq_tokens: int) -> list[Encoded]:
    """Raw text for language modelling: text + EOS, split into consecutive windows of max_seq_tokens.
    A special token's string in the text is text; the EOS after it is the only control token."""
    ids = _ids(tokenizer, example.text, as_text=True) + [tokenizer.eos_token_id]
    out = []
    for start in range(0, len(ids), max_seq_tokens):
        window = ids[start: start + max_seq_tokens]
        if len(window) < 2:
            continue
        out.append(Encoded(window, [IGNORE] + window[1:], example.source))
    return out


def encode_examples(examples: list[Example], tokenizer, template: Template, max_seq_tokens: int,
                    train_on_prompt: bool = False, required: bool = True) -> tuple[list[Encoded], EncodeReport]:
    """Encode every example; over-long ones are dropped and reported, never truncated.

    Raises `UserError` when nothing is left to train on (unless not `required`: eval data),
    naming the reason and the first example.
    """
    report = EncodeReport()
    encoded: list[Encoded] = []
    for example in examples:
        if example.text is not None:
            windows = encode_text(example, tokenizer, max_seq_tokens)
            encoded.extend(windows)
            report.kept += len(windows) > 0
            continue
        item = encode_chat(example, tokenizer, template, train_on_prompt)
        if len(item.input_ids) > max_seq_tokens:
            prompt_len = next((i for i, label in enumerate(item.labels) if i and label != IGNORE), len(item.labels))
            reason = (f"the prompt alone is {prompt_len} tokens and leaves no room for the answer "
                      f"within --max-seq-tokens {max_seq_tokens}" if prompt_len >= max_seq_tokens else
                      f"longer than --max-seq-tokens {max_seq_tokens}")
            report.drop(reason, example.source)
            continue
        if item.target_tokens == 0:
            report.drop("no trained token (an empty answer after templating, or every answer at weight 0)",
                        example.source)
            continue
        encoded.append(item)
        report.kept += 1
    if not encoded and required:
        reasons = "; ".join(report.lines()) or "no examples"
        raise UserError(f"nothing left to train on: {reasons}")
    return encoded, report


@dataclass
class Batch:
    """One micro-batch as tensors. `targets` are labels shifted left: targets[:, t] is the label of t+1."""

    input_ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor | None  # (B, T), None when packed
    position_ids: torch.Tensor  # (B, T)

    @property
    def target_tokens(self) -> int:
        return int((self.targets != IGNORE).sum())

    def model_inputs(self) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": self.input_ids, "position_ids": self.position_ids}
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask
        return inputs

    def to(self, device) -> Batch:
        move = (lambda t: None if t is None else t.to(device))
        return Batch(move(self.input_ids), move(self.targets), move(self.attention_mask), move(self.position_ids))


def _shift(labels: list[int]) -> list[int]:
    return labels[1:] + [IGNORE]


def collate_padded(items: list[Encoded], pad_id: int) -> Batch:
    """Right-pad to the longest item; padding is masked by position in attention and targets."""
    width = max(len(item.input_ids) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    targets = torch.full((len(items), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids)
        targets[row, :n] = torch.tensor(_shift(item.labels))
        attention[row, :n] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return Batch(input_ids, targets, attention, positions)


def collate_packed(items: list[Encoded]) -> Batch:
    """Concatenate the items into one row with no padding (B=1).

    Positions restart at 0 for every item; transformers turns restarting `position_ids` with
    no attention mask into a block-diagonal causal mask, so items never attend to each other.
    Each item's targets end with -100, so no item is trained to predict the next one.
    """
    input_ids: list[int] = []
    targets: list[int] = []
    positions: list[int] = []
    for item in items:
        input_ids.extend(item.input_ids)
        targets.extend(_shift(item.labels))
        positions.extend(range(len(item.input_ids)))
    as_row = (lambda xs: torch.tensor(xs, dtype=torch.long).unsqueeze(0))
    return Batch(as_row(input_ids), as_row(targets), None, as_row(positions))


def pad_token_id(tokenizer) -> int:
    """The id used for padding: the pad token, else EOS (safe, since padding is masked by position)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id
