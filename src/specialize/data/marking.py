"""What lint shows of an example: its trained text marked, and the lengths as a histogram.

`trained_pieces` reads an encoded example back as (text, trained) pieces from its labels, so
what is shown is what `finetune` will train, not a re-rendering of it.
"""

from __future__ import annotations

import math
import re

from rich.text import Text

from specialize.data.tokenize import IGNORE, Encoded

_TRAINED_RUN = re.compile(rb"\x01+")


def runs(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) spans of consecutive trained positions: one per answer turn."""
    mask = bytes(map(IGNORE.__ne__, labels))  # 1 where trained; scanned by the regex engine, not a Python loop
    return [m.span() for m in _TRAINED_RUN.finditer(mask)]


def byte_tokenizer():
    """A stand-in tokenizer for lint without --base: one token per UTF-8 byte, EOS `<|endoftext|>`.

    It lets every template and label check run on the real code path; only lengths mean
    something else (bytes, about 3-4 per token of a real tokenizer), so too_long is skipped.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>")


def trained_pieces(item: Encoded, tokenizer) -> list[tuple[str, bool]]:
    """The encoded example as (text, trained) pieces, read back from its labels."""
    bounds = sorted({0, len(item.input_ids)} | {i for run in runs(item.labels) for i in run})
    pieces, before = [], ""
    for a, b in zip(bounds, bounds[1:]):
        # Decoding the growing prefix keeps the spaces and bytes that a piece decoded alone can lose.
        upto = tokenizer.decode(item.input_ids[:b])
        text = upto[len(before):] if upto.startswith(before) else tokenizer.decode(item.input_ids[a:b])
        pieces.append((text, item.labels[a] != IGNORE))
        before = upto
    return [(text, trained) for text, trained in pieces if text]


def marked(pieces: list[tuple[str, bool]], plain: bool) -> Text:
    """Trained text in ⟦ ⟧ (plain) or bold green (terminal); masked text as is, or dim."""
    out = Text()
    for text, trained in pieces:
        style = None if plain else "bold green" if trained else "dim"
        out.append(f"⟦{text}⟧" if plain and trained else text, style)
    return out


def length_report(lengths: list[int], unit: str, bins: int = 8, width: int = 30) -> list[str]:
    """min / median / p95 / max (nearest rank) and a text histogram of `bins` equal-width bins."""
    ordered = sorted(lengths)
    rank = (lambda q: ordered[max(0, math.ceil(q * len(ordered)) - 1)])
    lines = [f"{unit} per example: min {ordered[0]} · median {rank(0.5)} · p95 {rank(0.95)} · max {ordered[-1]}"]
    step = max(1, math.ceil((ordered[-1] - ordered[0] + 1) / bins))
    counts = [0] * math.ceil((ordered[-1] - ordered[0] + 1) / step)
    for n in ordered:
        counts[(n - ordered[0]) // step] += 1
    digits, count_digits = len(str(ordered[0] + len(counts) * step - 1)), len(str(max(counts)))
    for b, count in enumerate(counts):
        low = ordered[0] + b * step
        bar = "█" * max(1 if count else 0, round(count / max(counts) * width))
        lines.append(f"  {low:>{digits}}–{low + step - 1:<{digits}} {count:>{count_digits}} {bar}".rstrip())
    return lines
