"""Examples → token ids and labels, and micro-batches (padded or packed).

The rules every fine-tuning bug report is about, pinned by tests:
- prompt tokens get label -100 (unless `train_on_prompt`), answer tokens and EOS are trained;
- padding is masked *by position* (attention mask and labels), never by token id, so EOS is
  still trained when the tokenizer pads with its EOS token;
- an example longer than `max_seq_tokens` is dropped and counted, never cut;
- the first token of every example is never a target, packed or not, so a packed row never
  predicts one example from another.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from specialize.data.formats import Example
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

    def drop(self, reason: str, source: str) -> None:
        self.dropped[reason] += 1
        self.first_dropped.setdefault(reason, source)

    def lines(self) -> list[str]:
        return [f"dropped {n} example(s): {reason} (first: {self.first_dropped[reason]})"
                for reason, n in self.dropped.items()]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_chat(example: Example, tokenizer, template: Template, train_on_prompt: bool = False) -> Encoded:
    """Tokenise a conversation piece by piece, so the prompt's tokens equal those at inference."""
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments(template, tokenizer, example.messages):
        ids = _ids(tokenizer, text)
        input_ids.extend(ids)
        labels.extend(ids if (trained or train_on_prompt) else [IGNORE] * len(ids))
    if labels:
        labels[0] = IGNORE  # nothing predicts the first token
    return Encoded(input_ids, labels, example.source)


def encode_text(example: Example, tokenizer, max_seq_tokens: int) -> list[Encoded]:
    """Raw text for language modelling: text + EOS, split into consecutive windows of max_seq_tokens."""
    ids = _ids(tokenizer, example.text) + [tokenizer.eos_token_id]
    out = []
    for start in range(0, len(ids), max_seq_tokens):
        window = ids[start: start + max_seq_tokens]
        if len(window) < 2:
            continue
        out.append(Encoded(window, [IGNORE] + window[1:], example.source))
    return out


def encode_examples(examples: list[Example], tokenizer, template: Template, max_seq_tokens: int,
                    train_on_prompt: bool = False) -> tuple[list[Encoded], EncodeReport]:
    """Encode every example; over-long ones are dropped and reported, never truncated.

    Raises `UserError` when nothing is left to train on, naming the reason and the first example.
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
            report.drop("no trained token (empty answer after templating)", example.source)
            continue
        encoded.append(item)
        report.kept += 1
    if not encoded:
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

    def to(self, device) -> "Batch":
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
